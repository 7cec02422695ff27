import dataclasses

import numpy as np
import pytest

from common.backend import DistInfo
from common.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, validate
from common.data import DataError, DataLoader, TokenStream, loader_for, val_batches, val_batches_for
from common.shards import write_shard

SIZES = [1001, 777, 1553]  # odd sizes: rows straddle shard ends
N = sum(SIZES)
T = 8
SEQUENCES = (N - 1) // T  # block-sized sequences per epoch in the shuffled order
ORDERS = ("shuffled", "stream")


@pytest.fixture
def folder(tmp_path):
    """Train shards whose concatenation in name order is arange(N): a token's value is its position."""
    start = 0
    for i, size in enumerate(SIZES, 1):
        write_shard(tmp_path / f"t_train_{i:06d}.bin", np.arange(start, start + size))
        start += size
    write_shard(tmp_path / "t_val_000000.bin", np.arange(40000, 40500))
    return tmp_path


def loader(folder, B=4, world=1, rank=0, accum=1, seed=0, order="shuffled"):
    return DataLoader(folder, B, T, B * T * world * accum, rank=rank, world_size=world, seed=seed, order=order)


def step_tokens(folder, world, B, accum, step, order="shuffled"):
    """All x rows of one optimizer step, in (micro-step, rank, row) order."""
    loaders = [loader(folder, B, world, r, accum, order=order) for r in range(world)]
    return np.concatenate([loaders[r].micro_batch(step, m)[0] for m in range(accum) for r in range(world)])


@pytest.mark.parametrize("order", ORDERS)
def test_shapes_and_shift(folder, order):
    dl = loader(folder, B=4, accum=2, order=order)
    x, y = dl.next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == np.int32
    assert np.array_equal(y, x + 1)  # stream is arange, so the next token is value + 1
    if order == "stream":
        assert np.array_equal(x.ravel(), np.arange(4 * T))
    else:  # whole block-aligned sequences
        assert np.array_equal(x, x[:, :1] + np.arange(T)) and not (x[:, 0] % T).any()


@pytest.mark.parametrize("order", ORDERS)
def test_ranks_disjoint_and_complete(folder, order):
    for step in (0, 3):
        one = step_tokens(folder, 1, 4, 4, step, order)
        r0 = np.concatenate([loader(folder, 4, 2, 0, 2, order=order).micro_batch(step, m)[0] for m in range(2)])
        r1 = np.concatenate([loader(folder, 4, 2, 1, 2, order=order).micro_batch(step, m)[0] for m in range(2)])
        assert not set(r0.ravel()) & set(r1.ravel())
        assert sorted(np.concatenate([r0, r1]).ravel()) == sorted(one.ravel())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("step", [0, 1, 5, 30])
def test_same_tokens_whatever_world_and_accum(folder, step, order):
    ref = step_tokens(folder, 1, 4, 4, step, order)
    for world, B, accum in [(2, 4, 2), (4, 4, 1), (1, 2, 8)]:
        assert np.array_equal(step_tokens(folder, world, B, accum, step, order).reshape(-1, T), ref)
    if order == "stream" and step < 3:
        assert np.array_equal(ref.ravel(), np.arange(step * 16 * T, (step + 1) * 16 * T))
    if order == "shuffled" and step < 3:  # rows [16 s, 16 s + 16) of the seed's epoch-0 permutation
        perm = loader(folder).permutation(0)
        assert np.array_equal(ref[:, 0], perm[step * 16:(step + 1) * 16] * T)


def test_shuffled_epoch_visits_every_sequence_once(folder):
    """4 rows a step: an epoch of SEQUENCES = 416 sequences is 104 steps, each sequence once."""
    dl = loader(folder, B=2, accum=2, seed=5)
    per_epoch = SEQUENCES // 4
    firsts = [np.concatenate(dl.next_step()[0])[:, 0] for _ in range(2 * per_epoch)]
    epoch0, epoch1 = np.concatenate(firsts[:per_epoch]), np.concatenate(firsts[per_epoch:])
    for epoch in (epoch0, epoch1):
        assert sorted(epoch // T) == list(range(SEQUENCES))
    assert not np.array_equal(epoch0, epoch1)  # each epoch has its own order
    assert not np.array_equal(epoch0, np.arange(SEQUENCES) * T)  # and it is not the stream's
    # a step's rows come from across the corpus, not one neighbourhood of it
    assert np.ptp(firsts[0]) > N / 4


def test_shuffled_order_follows_the_seed(folder):
    orders = {tuple(loader(folder, seed=seed).permutation(0)) for seed in range(4)}
    assert len(orders) == 4
    a, b = loader(folder, seed=7), loader(folder, seed=7)
    assert np.array_equal(a.permutation(3), b.permutation(3))
    assert a.permutation(0).dtype == np.int32  # 4 bytes a sequence: 40 MB for 10B tokens at T = 1024
    assert len({tuple(loader(folder, seed=seed).permutation(0)) for seed in (-1, 1, -1)}) == 2  # any int seeds it
    for step in (0, 50, 150):
        assert np.array_equal(a.step_batch(step)[0], b.step_batch(step)[0])


def test_no_token_skipped_at_shard_ends(folder):
    stream = TokenStream(folder, "train")
    assert np.array_equal(stream.read(0, N), np.arange(N))
    dl = loader(folder, B=3, accum=1, order="stream")
    rows = [dl.next_batch()[0] for _ in range(N // (3 * T))]
    assert np.array_equal(np.concatenate(rows).ravel(), np.arange(len(rows) * 3 * T))


def test_epoch_one_reshuffles_from_seed(folder):
    shards = np.split(np.arange(N), np.cumsum(SIZES)[:-1])
    orders = set()
    for seed in range(8):
        stream = TokenStream(folder, "train", seed=seed)
        order = stream.order(1)
        assert sorted(order) == [0, 1, 2]
        assert np.array_equal(order, TokenStream(folder, "train", seed=seed).order(1))
        assert np.array_equal(stream.read(N, N), np.concatenate([shards[i] for i in order]))
        assert np.array_equal(stream.read(N - 5, 10)[:5], np.arange(N - 5, N))  # across the epoch end
        orders.add(tuple(order))
    assert len(orders) > 1


# Shuffled: 104 steps (208 micro-steps) an epoch. 206 resumes two micro-steps before the epoch ends and
# continues across it; 211 resumes inside epoch 1. Stream: 120 micro-steps crosses into epoch 1.
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("micro_steps", [4, 9, 120, 206, 211])
def test_exact_resume(folder, micro_steps, order):
    dl = loader(folder, B=2, accum=2, seed=3, order=order)
    for _ in range(micro_steps):
        dl.next_batch()
    state = dl.state_dict()
    assert state["order"] == order and state["micro_step"] == micro_steps % 2
    if order == "shuffled":
        assert state["epoch"] == (micro_steps // 2 * 4) // SEQUENCES
    expected = [dl.next_batch() for _ in range(6)]
    resumed = loader(folder, B=2, accum=2, seed=3, order=order)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(6))):
        assert np.array_equal(x, rx) and np.array_equal(y, ry)


def test_resume_on_another_world_size(folder):
    one = loader(folder, B=2, accum=4, seed=3)
    for _ in range(120):  # 30 steps
        one.next_batch()
    two = [loader(folder, B=2, world=2, rank=r, accum=2, seed=3) for r in range(2)]
    for dl in two:
        dl.load_state_dict(one.state_dict())
    want = np.concatenate(one.next_step()[0])
    got = np.stack([dl.next_step()[0] for dl in two], axis=1).reshape(-1, T)  # (micro, rank, row) order
    assert np.array_equal(got, want)


def test_resume_refuses_another_order_or_data(folder, tmp_path):
    stream = loader(folder, order="stream")
    stream.next_step()
    with pytest.raises(DataError, match="data.order stream"):
        loader(folder).load_state_dict(stream.state_dict())
    old = {k: v for k, v in stream.state_dict().items() if k != "order"}  # written before data.order existed
    with pytest.raises(DataError, match="data.order stream"):
        loader(folder).load_state_dict(old)
    shuffled = loader(folder)
    shuffled.next_step()
    with pytest.raises(DataError, match="data.order shuffled"):
        loader(folder, order="stream").load_state_dict(shuffled.state_dict())
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "t_train_000001.bin", np.arange(2000))
    with pytest.raises(DataError, match="does not fit"):
        loader(other).load_state_dict(shuffled.state_dict())
    with pytest.raises(DataError, match="not a multiple"):
        loader(folder, B=3).load_state_dict(shuffled.state_dict())


def test_bad_order_is_named(folder):
    with pytest.raises(DataError, match="data.order .*'foo'"):
        loader(folder, order="foo")
    with pytest.raises(DataError, match="data.order"):
        list(val_batches(folder, 2, T, 100, order="foo"))
    with pytest.raises(ConfigError, match="data.order must be one of shuffled, stream, got 'foo'"):
        validate(Config(data=DataConfig(order="foo")))


def test_val_batches_repeat(folder):
    for order in ORDERS:
        a = list(val_batches(folder, 2, T, val_tokens=100, order=order))
        b = list(val_batches(folder, 2, T, val_tokens=100, order=order))
        assert len(a) == 100 // (2 * T)
        for (x, y), (bx, by) in zip(a, b):
            assert np.array_equal(x, bx) and np.array_equal(y, by) and np.array_equal(y, x + 1)
    stream = list(val_batches(folder, 2, T, val_tokens=100, order="stream"))
    assert np.array_equal(stream[0][0].ravel(), np.arange(40000, 40000 + 2 * T))


def test_shuffled_val_spans_the_split(folder):
    """12 val rows spaced over the split's 62 sequences (not its first 96 tokens); all 62 when val_tokens
    covers it, identical to the stream's."""
    rows = np.concatenate([x for x, _ in val_batches(folder, 2, T, val_tokens=100)])
    assert np.array_equal(rows[:, 0], 40000 + np.arange(12) * 62 // 12 * T)
    whole = [np.concatenate(b) for b in zip(*val_batches(folder, 2, T, val_tokens=10_000))]
    streamed = [np.concatenate(b) for b in zip(*val_batches(folder, 2, T, val_tokens=10_000, order="stream"))]
    assert len(whole[0]) == 62 and all(np.array_equal(a, b) for a, b in zip(whole, streamed))


def test_val_batches_split_over_ranks(folder):
    one = np.concatenate([x for x, _ in val_batches(folder, 4, T, val_tokens=320)])
    ranks = [[x for x, _ in val_batches(folder, 2, T, val_tokens=320, rank=r, world_size=2)] for r in range(2)]
    assert np.array_equal(np.concatenate([np.concatenate(step) for step in zip(*ranks)]), one)


def test_val_tokens_too_small(folder):
    with pytest.raises(DataError, match="val_tokens"):
        list(val_batches(folder, 4, T, val_tokens=10))


def test_no_train_shards_names_folder(tmp_path):
    write_shard(tmp_path / "t_val_000000.bin", np.arange(100))
    with pytest.raises(DataError, match=str(tmp_path)):
        loader(tmp_path)


@pytest.mark.parametrize("order", ORDERS)
def test_next_step_stacks_the_micro_batches(folder, order):
    a, b = loader(folder, B=2, accum=3, order=order), loader(folder, B=2, accum=3, order=order)
    for _ in range(2):
        xs, ys = a.next_step()
        assert xs.shape == ys.shape == (3, 2, T)
        for m in range(3):
            x, y = b.next_batch()
            assert np.array_equal(xs[m], x) and np.array_equal(ys[m], y)


def test_a_loader_built_by_hand_reads_the_stream(folder):
    """Without an order, DataLoader keeps build-nanogpt's (the parity check's batches); configs say shuffled."""
    assert np.array_equal(DataLoader(folder, 4, T, 4 * T).next_batch()[0].ravel(), np.arange(4 * T))
    assert DataConfig().order == "shuffled"


@pytest.mark.parametrize("order", ORDERS)
def test_loader_and_val_batches_from_a_config(folder, order):
    """Two processes of two local replicas each: rows per process = micro_batch_size × local_replicas."""
    cfg = Config(model=ModelConfig(block_size=T), optim=OptimConfig(total_batch_size=128, micro_batch_size=2),
                 data=DataConfig(dir=str(folder), val_tokens=128, order=order), run=RunConfig(seed=9))
    dist = DistInfo(process_index=1, process_count=2, data_parallel_size=4, local_replicas=2)
    got = loader_for(cfg, dist)
    want = DataLoader(folder, 4, T, 128, rank=1, world_size=2, seed=9, vocab_size=50257, order=order)
    for a, b in zip(got.step_batch(7), want.step_batch(7)):
        assert np.array_equal(a, b)
    assert got.accum == 2
    pairs = zip(val_batches_for(cfg, dist), val_batches(folder, 4, T, 128, rank=1, world_size=2, order=order))
    assert all(np.array_equal(x, bx) and np.array_equal(y, by) for (x, y), (bx, by) in pairs)
    more = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_tokens=32))
    assert len(list(val_batches_for(more, dist, val_tokens=256))) == 256 // (4 * T * 2)
