"""The data loader shared by both backends.

The training split is read as one endless token stream: epoch e is every shard concatenated, in
name order for epoch 0 and in an order shuffled from (seed, e) after that, so no token is skipped at a
shard end or at the end of an epoch. Optimizer step s consumes stream tokens
[s·total_batch_size, (s+1)·total_batch_size] (+1 for the last target) as total_batch_size / T rows,
whatever the world size or micro-batch size. Row g of a step goes to micro-step m = g // (R·B) and
rank r = (g // B) % R, as build-nanogpt's DataLoaderLite strides ranks, so 1 process × 4 micro-steps,
2 ranks × 2 and 4 ranks × 1 train on the same tokens, and a run can resume on another world size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from common.shards import ShardError, list_shards, read_header, read_shard


class DataError(ValueError):
    """Data that cannot serve the requested batches; the message names the folder or field."""


class TokenStream:
    """Shards of one split as an endless stream of tokens (epochs chained, shards reordered per epoch)."""

    def __init__(self, folder: str | Path, split: str, seed: int = 0, vocab_size: int | None = None,
                 shuffle: bool = True):
        self.folder = Path(folder)
        try:
            self.paths = list_shards(self.folder, split)
        except ShardError as e:
            raise DataError(str(e)) from None
        if not self.paths:
            raise DataError(f"{self.folder}: no '{split}' shards (expected files like *_{split}_000000.bin)")
        self.sizes = np.array([read_header(p).num_tokens for p in self.paths], dtype=np.int64)
        self.epoch_tokens = int(self.sizes.sum())
        if self.epoch_tokens == 0:
            raise DataError(f"{self.folder}: the '{split}' shards hold no tokens")
        self.seed, self.vocab_size, self.shuffle = seed, vocab_size, shuffle
        self._tokens: dict[int, np.ndarray] = {}
        self._orders: dict[int, np.ndarray] = {}

    def tokens(self, shard: int) -> np.ndarray:
        if shard not in self._tokens:  # validated on first use, then kept memory-mapped
            self._tokens[shard] = read_shard(self.paths[shard], vocab_size=self.vocab_size)
        return self._tokens[shard]

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.paths)
            if epoch == 0 or not self.shuffle:
                self._orders[epoch] = np.arange(n)
            else:
                self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return self._orders[epoch]

    def locate(self, offset: int) -> tuple[int, int, int]:
        """(epoch, index in that epoch's shard order, position in the shard) of a stream offset."""
        epoch, within = divmod(offset, self.epoch_tokens)
        ends = np.cumsum(self.sizes[self.order(epoch)])
        idx = int(np.searchsorted(ends, within, side="right"))
        start = int(ends[idx - 1]) if idx else 0
        return int(epoch), idx, int(within - start)

    def offset(self, epoch: int, shard: int, position: int) -> int:
        sizes = self.sizes[self.order(epoch)]
        if not (0 <= shard < len(sizes)) or not (0 <= position <= sizes[shard]) or epoch < 0:
            raise DataError(f"{self.folder}: loader state (epoch {epoch}, shard {shard}, position {position}) "
                            f"does not fit these shards")
        return int(epoch * self.epoch_tokens + sizes[:shard].sum() + position)

    def read(self, offset: int, n: int) -> np.ndarray:
        """n tokens starting at a stream offset, as int32, crossing shard and epoch ends."""
        out = np.empty(n, dtype=np.int32)
        filled = 0
        while filled < n:
            epoch, idx, pos = self.locate(offset + filled)
            shard = int(self.order(epoch)[idx])
            piece = self.tokens(shard)[pos:pos + (n - filled)]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
        return out


class DataLoader:
    """Yields this rank's (x, y) micro-batches of shape (B, T); y is x shifted by one token."""

    def __init__(self, folder: str | Path, batch_size: int, block_size: int, total_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, vocab_size: int | None = None,
                 split: str = "train"):
        self.B, self.T, self.rank, self.world = batch_size, block_size, rank, world_size
        per_micro = batch_size * block_size * world_size
        if total_batch_size % per_micro:
            raise DataError(f"optim.total_batch_size ({total_batch_size}) is not divisible by "
                            f"batch × block × world ({per_micro})")
        self.total = total_batch_size
        self.accum = total_batch_size // per_micro
        self.stream = TokenStream(folder, split, seed=seed, vocab_size=vocab_size)
        if self.stream.epoch_tokens < block_size + 1:
            raise DataError(f"{folder}: the '{split}' split has {self.stream.epoch_tokens} tokens, fewer than "
                            f"model.block_size + 1 = {block_size + 1}")
        self.step, self.micro_step = 0, 0

    def micro_batch(self, step: int, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of (step, micro_step) for this rank: a pure function of its arguments."""
        first_row = (micro_step * self.world + self.rank) * self.B
        buf = self.stream.read(step * self.total + first_row * self.T, self.B * self.T + 1)
        return buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.micro_batch(self.step, self.micro_step)
        self.micro_step += 1
        if self.micro_step == self.accum:
            self.step, self.micro_step = self.step + 1, 0
        return x, y

    def step_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """All of this rank's micro-batches of optimizer step `step`, shaped (accum, B, T)."""
        xs, ys = zip(*(self.micro_batch(step, m) for m in range(self.accum)))
        return np.stack(xs), np.stack(ys)

    def next_step(self) -> tuple[np.ndarray, np.ndarray]:
        if self.micro_step:
            raise DataError("next_step() called in the middle of an optimizer step")
        batch = self.step_batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the current optimizer step starts, plus the micro-step within it."""
        epoch, shard, position = self.stream.locate(self.step * self.total)
        return {"epoch": epoch, "shard": shard, "position": position, "micro_step": self.micro_step,
                "total_batch_size": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        offset = self.stream.offset(int(state["epoch"]), int(state["shard"]), int(state["position"]))
        if offset % self.total:
            raise DataError(f"loader state at token {offset} is not a multiple of optim.total_batch_size "
                            f"({self.total}); the batch size changed since the checkpoint")
        self.step, self.micro_step = offset // self.total, int(state.get("micro_step", 0))


def val_batches(folder: str | Path, batch_size: int, block_size: int, val_tokens: int, rank: int = 0,
                world_size: int = 1, vocab_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same validation batches at every evaluation: the first `val_tokens` of the val split."""
    stream = TokenStream(folder, "val", vocab_size=vocab_size, shuffle=False)
    per_step = batch_size * block_size * world_size
    usable = min(val_tokens, stream.epoch_tokens - 1)
    steps = usable // per_step
    if steps == 0:
        raise DataError(f"data.val_tokens ({val_tokens}) with {stream.epoch_tokens} val tokens in {folder} gives "
                        f"no full batch of {per_step} tokens")
    for s in range(steps):
        buf = stream.read((s * world_size + rank) * batch_size * block_size, batch_size * block_size + 1)
        yield buf[:-1].reshape(batch_size, block_size), buf[1:].reshape(batch_size, block_size)


def num_val_steps(folder: str | Path, batch_size: int, block_size: int, val_tokens: int, world_size: int = 1) -> int:
    stream = TokenStream(folder, "val", shuffle=False)
    return min(val_tokens, stream.epoch_tokens - 1) // (batch_size * block_size * world_size)
