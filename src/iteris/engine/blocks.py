"""Block stacks: models whose target layers sit in a plain chain of blocks can be run one block at a time
(DESIGN.md §3.7), each block on the hidden states stored at its boundary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .forward import Batch, StopForward, run_forward


@dataclass
class BlockCall:
    """One block's inputs for one batch: the hidden state plus everything else it was called with."""

    hidden: torch.Tensor
    args: tuple  # positional arguments after the hidden state
    kwargs: dict

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: torch.Tensor):
        return self.forward(block, hidden)

    def forward(self, block: nn.Module, hidden: torch.Tensor):
        """The block's output, with autograd where the caller has it on (a block-level fit)."""
        out = block(hidden, *self.args, **self.kwargs) if self.args is not None else block(**{**self.kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Stack:
    """A stack of blocks that can be run one block at a time (DESIGN.md §3.7).

    ``blocks`` are the blocks up to the deepest one holding a target layer (the rest never matter);
    ``block_of`` maps each target layer to its block.
    """

    blocks: list[nn.Module]
    block_of: dict[str, int]


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple | None, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), None, rest


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def block_list(model: nn.Module, layer_names: list[str]) -> tuple[nn.ModuleList, dict[str, int]] | None:
    """The outermost list of blocks holding every target layer, and each layer's block index (by structure
    alone: whether the blocks run as a plain chain is ``find_stack``'s question)."""
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{path}." if path else ""
        block_of = {}
        for name in layer_names:
            head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            if not head.isdigit():
                break
            block_of[name] = int(head)
        else:
            return module, block_of  # named_modules walks outer modules first
    return None


@torch.no_grad()
def find_stack(model: nn.Module, layers: dict[str, nn.Module], probe: Batch) -> Stack | None:
    """The block stack holding every target layer, if the model runs it as a plain chain.

    A plain chain: each block is called once, in order, on the previous block's output, with every other
    argument the very same object for every block (masks, rotary tables). Then running block k alone on
    stored inputs reproduces the full forward. Anything else (encoder-decoder stacks, blocks that pass
    state to the next one, per-block masks) returns None and the whole model runs instead.
    """
    found = block_list(model, list(layers))
    if found is None:
        return None
    module_list, block_of = found
    blocks = list(module_list)[: max(block_of.values()) + 1]
    calls: list[tuple[int, tuple, dict, object]] = []
    handles = []

    def make(index):
        def hook(module, args, kwargs, output):
            calls.append((index, args, kwargs, output))

        return hook

    for index, block in enumerate(blocks):
        handles.append(block.register_forward_hook(make(index), with_kwargs=True))
    try:
        run_forward(model, probe)
    finally:
        for h in handles:
            h.remove()
    if [c[0] for c in calls] != list(range(len(blocks))):
        return None
    first_hidden, first_args, first_kwargs = _split_call(calls[0][1], calls[0][2])
    previous = calls[0][3]
    for _, args, kwargs, output in calls[1:]:
        hidden, rest, kw = _split_call(args, kwargs)
        prev_hidden = previous[0] if isinstance(previous, (tuple, list)) else previous
        if hidden is not prev_hidden or not _same_value(rest, first_args) or kw.keys() != first_kwargs.keys():
            return None
        if not all(_same_value(kw[k], first_kwargs[k]) for k in kw):
            return None
        previous = output
    return Stack(blocks=blocks, block_of=block_of)


@torch.no_grad()
def first_block_call(model: nn.Module, stack: Stack, batch: Batch) -> BlockCall:
    """What the first block receives for this batch (the model runs only up to it)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["call"] = _split_call(args, kwargs)
        raise StopForward

    # first among the block's pre-hooks: a block sharded over processes is not gathered for a call that stops
    handle = stack.blocks[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        run_forward(model, batch)
    except StopForward:
        pass
    finally:
        handle.remove()
    hidden, args, kwargs = seen["call"]
    return BlockCall(hidden=hidden, args=args, kwargs=kwargs)
