"""The data loader shared by both backends.

The training split is read as one token stream: epoch 0 is every shard concatenated in name order.
Optimizer step s trains on R = total_batch_size / T rows of T tokens (each with its next-token targets,
T + 1 tokens read), whatever the world size or micro-batch size, in one of two orders (data.order):

- "shuffled" (default): the stream is cut into block-sized sequences [i·T, i·T + T + 1), and epoch e
  visits them in a permutation seeded by (seed, e); step s takes positions [s·R, (s+1)·R) of that
  order, continuing into the next epoch's permutation. Each step mixes rows from across the corpus, so
  a corpus of long, sorted files (the stdlib) does not give every step one or two documents.
- "stream": build-nanogpt's order. Step s consumes stream tokens [s·R·T, (s+1)·R·T] (+1 for the last
  target); epochs after 0 chain the shards in an order shuffled from (seed, e), so no token is skipped
  at a shard end or at the end of an epoch.

Row g of a step goes to micro-step m = g // (W·B) and rank r = (g // B) % W, as build-nanogpt's
DataLoaderLite strides ranks, so 1 process × 4 micro-steps, 2 ranks × 2 and 4 ranks × 1 train on the
same tokens, and a run can resume on another world size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from common.backend import DistInfo
from common.config import ORDERS, Config
from common.shards import ShardError, list_shards, read_header, read_shard
from common.usage import InputError


class DataError(InputError):
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
    """Yields this rank's (x, y) micro-batches of shape (B, T); y is x shifted by one token.

    `order` defaults to "stream" here, so a loader built by hand (the parity check, the benches) reads the
    batches its tolerances and figures were measured on; loader_for(cfg, dist) follows data.order, whose
    default is "shuffled".
    """

    def __init__(self, folder: str | Path, batch_size: int, block_size: int, total_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, vocab_size: int | None = None,
                 split: str = "train", order: str = "stream"):
        check_order(order)
        self.B, self.T, self.rank, self.world, self.seed, self.order = (batch_size, block_size, rank, world_size,
                                                                         seed, order)
        per_micro = batch_size * block_size * world_size
        if total_batch_size % per_micro:
            raise DataError(f"optim.total_batch_size ({total_batch_size}) is not divisible by "
                            f"batch × block × world ({per_micro})")
        self.total = total_batch_size
        self.rows = total_batch_size // block_size
        self.accum = total_batch_size // per_micro
        self.stream = TokenStream(folder, split, seed=seed, vocab_size=vocab_size)
        if self.stream.epoch_tokens < block_size + 1:
            raise DataError(f"{folder}: the '{split}' split has {self.stream.epoch_tokens} tokens, fewer than "
                            f"model.block_size + 1 = {block_size + 1}")
        self.sequences = (self.stream.epoch_tokens - 1) // block_size  # per epoch in the shuffled order
        self._permutations: dict[int, np.ndarray] = {}
        self.step, self.micro_step = 0, 0

    def permutation(self, epoch: int) -> np.ndarray:
        """The shuffled order's epoch `epoch`: sequence indices, int32 (40 MB for FineWeb-10B at T = 1024)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a step spans at most two epochs unless an epoch is shorter
                self._permutations.pop(min(self._permutations))
            dtype = np.int32 if self.sequences <= np.iinfo(np.int32).max else np.int64
            rng = np.random.default_rng([self.seed % 2**64, epoch])  # numpy refuses negative seeds, run.seed not
            self._permutations[epoch] = rng.permutation(np.arange(self.sequences, dtype=dtype))
        return self._permutations[epoch]

    def rows_at(self, first: int, count: int) -> np.ndarray:
        """Rows [first, first + count) of the shuffled order (counted from step 0), as (count, T + 1) int32."""
        out = np.empty((count, self.T + 1), dtype=np.int32)
        for i in range(count):
            epoch, position = divmod(first + i, self.sequences)
            out[i] = self.stream.read(int(self.permutation(epoch)[position]) * self.T, self.T + 1)
        return out

    def micro_batch(self, step: int, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of (step, micro_step) for this rank: a pure function of its arguments."""
        first_row = (micro_step * self.world + self.rank) * self.B
        if self.order == "stream":
            buf = self.stream.read(step * self.total + first_row * self.T, self.B * self.T + 1)
            return buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)
        rows = self.rows_at(step * self.rows + first_row, self.B)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

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

    def state_dict(self) -> dict[str, int | str]:
        """Where the current optimizer step starts, plus the micro-step within it."""
        common = {"order": self.order, "micro_step": self.micro_step, "total_batch_size": self.total}
        if self.order == "stream":
            epoch, shard, position = self.stream.locate(self.step * self.total)
            return {"epoch": epoch, "shard": shard, "position": position, **common}
        epoch, sequence = divmod(self.step * self.rows, self.sequences)
        return {"epoch": epoch, "sequence": sequence, "sequences": self.sequences, **common}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        saved = state.get("order", "stream")  # states written before the shuffled order existed
        if saved != self.order:
            raise DataError(f"the checkpoint's loader used data.order '{saved}', the config says '{self.order}'; "
                            f"resume with --data.order {saved}")
        if self.order == "stream":
            position = self.stream.offset(int(state["epoch"]), int(state["shard"]), int(state["position"]))
            unit, what = self.total, "token"
        else:
            epoch, sequence = int(state["epoch"]), int(state["sequence"])
            if int(state["sequences"]) != self.sequences or not 0 <= sequence < self.sequences or epoch < 0:
                raise DataError(f"{self.stream.folder}: loader state (epoch {epoch}, sequence {sequence} of "
                                f"{state['sequences']}) does not fit these shards ({self.sequences} sequences of "
                                f"{self.T} tokens)")
            position, unit, what = epoch * self.sequences + sequence, self.rows, "sequence"
        if position % unit:
            raise DataError(f"loader state at {what} {position} is not a multiple of a step ({unit} {what}s); "
                            f"optim.total_batch_size or model.block_size changed since the checkpoint")
        self.step, self.micro_step = position // unit, int(state.get("micro_step", 0))


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise DataError(f"data.order must be one of {', '.join(ORDERS)}, got '{order}'")


def val_batches(folder: str | Path, batch_size: int, block_size: int, val_tokens: int, rank: int = 0,
                world_size: int = 1, vocab_size: int | None = None,
                order: str = "shuffled") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same validation batches at every evaluation, `val_tokens` (rounded down to whole batches) in all.

    "stream" reads the first val_tokens of the val split (build-nanogpt); "shuffled" reads block-sized
    sequences spaced evenly over the whole split, so a val_tokens smaller than the split still scores
    every part of it rather than its first few documents. When val_tokens covers the split, both are the
    same sequences in the same order.
    """
    check_order(order)
    stream = TokenStream(folder, "val", vocab_size=vocab_size, shuffle=False)
    per_step = batch_size * block_size * world_size
    usable = min(val_tokens, stream.epoch_tokens - 1)
    steps = usable // per_step
    if steps == 0:
        raise DataError(f"data.val_tokens ({val_tokens}) with {stream.epoch_tokens} val tokens in {folder} gives "
                        f"no full batch of {per_step} tokens")
    rows = steps * batch_size * world_size
    available = (stream.epoch_tokens - 1) // block_size
    starts = np.arange(rows, dtype=np.int64) * (available if order == "shuffled" else rows) // rows * block_size
    for s in range(steps):
        first = (s * world_size + rank) * batch_size
        buf = np.stack([stream.read(int(start), block_size + 1) for start in starts[first:first + batch_size]])
        yield np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])


def loader_for(cfg: Config, dist: DistInfo) -> DataLoader:
    """The training loader of `cfg` for this process: its rows of each step, in data.order."""
    o = cfg.optim
    return DataLoader(cfg.data.dir, batch_size=o.micro_batch_size * dist.local_replicas,
                      block_size=cfg.model.block_size, total_batch_size=o.total_batch_size, rank=dist.process_index,
                      world_size=dist.process_count, seed=cfg.run.seed, vocab_size=cfg.model.vocab_size,
                      order=cfg.data.order)


def val_batches_for(cfg: Config, dist: DistInfo,
                    val_tokens: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's validation batches of `cfg` (data.val_tokens unless `val_tokens` is given)."""
    return val_batches(cfg.data.dir, cfg.optim.micro_batch_size * dist.local_replicas, cfg.model.block_size,
                       cfg.data.val_tokens if val_tokens is None else val_tokens, rank=dist.process_index,
                       world_size=dist.process_count, vocab_size=cfg.model.vocab_size, order=cfg.data.order)
