"""nanobert: BERT written twice, once in raw PyTorch and once in pure MLX.

Import the backend you want explicitly (``nanobert.model_torch`` or ``nanobert.model_mlx``);
this package itself imports neither framework.
"""

__version__ = "0.1.0"
