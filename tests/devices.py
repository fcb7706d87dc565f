"""Where the tests run kernels: CUDA when there is a GPU, else CPU tensors under Triton's interpreter
(tests/conftest.py switches the interpreter on before triton is imported)."""
import torch

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
