"""Shared by the ops tests: activation checkpointing must replay a noise op's draws on recompute."""
import torch
import torch.utils.checkpoint


def assert_checkpoint_replays_the_noise(block, x: torch.Tensor, layer: torch.nn.Linear) -> None:
    """``block(x)`` (which runs ``layer`` and a noise op whose gradient depends on the noise) gives bitwise the same
    gradients of ``x`` and ``layer.weight`` plain and under ``torch.utils.checkpoint`` from the same seed."""
    torch.manual_seed(0)
    block(x).sum().backward()
    plain = (x.grad.clone(), layer.weight.grad.clone())
    x.grad, layer.weight.grad, layer.bias.grad = None, None, None
    torch.manual_seed(0)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, plain[0]) and torch.equal(layer.weight.grad, plain[1])
