"""Scripts that reproduce the paper's figures and tables in miniature; run each as `python -m scripts.<name>`."""
