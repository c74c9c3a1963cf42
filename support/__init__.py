"""The engineering around the paper's method (see support/README.md): nothing here is an equation of the paper."""
