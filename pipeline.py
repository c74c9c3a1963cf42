"""The Python entry point, `SoundingVideoPipeline` (support/pipeline.py): load a run or a released folder, generate
sounding videos with Algorithm 1 (sample.generate), save them. Kept at the top level so that
`from pipeline import SoundingVideoPipeline` works from the repository root."""
from support.pipeline import SoundingVideoPipeline, SoundingVideoPipelineOutput

__all__ = ["SoundingVideoPipeline", "SoundingVideoPipelineOutput"]
