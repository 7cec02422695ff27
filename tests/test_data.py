import numpy as np
import pytest

from common.data import DataError, DataLoader, TokenStream, val_batches
from common.shards import write_shard

SIZES = [1001, 777, 1553]  # odd sizes: rows straddle shard ends
N = sum(SIZES)
T = 8


@pytest.fixture
def folder(tmp_path):
    """Train shards whose concatenation in name order is arange(N): a token's value is its position."""
    start = 0
    for i, size in enumerate(SIZES, 1):
        write_shard(tmp_path / f"t_train_{i:06d}.bin", np.arange(start, start + size))
        start += size
    write_shard(tmp_path / "t_val_000000.bin", np.arange(40000, 40500))
    return tmp_path


def loader(folder, B=4, world=1, rank=0, accum=1, seed=0):
    return DataLoader(folder, B, T, B * T * world * accum, rank=rank, world_size=world, seed=seed)


def step_tokens(folder, world, B, accum, step):
    """All x rows of one optimizer step, in (micro-step, rank, row) order."""
    loaders = [loader(folder, B, world, r, accum) for r in range(world)]
    return np.concatenate([loaders[r].micro_batch(step, m)[0] for m in range(accum) for r in range(world)])


def test_shapes_and_shift(folder):
    dl = loader(folder, B=4, accum=2)
    x, y = dl.next_batch()
    assert x.shape == y.shape == (4, T)
    assert np.array_equal(y, x + 1)  # stream is arange, so the next token is value + 1
    assert np.array_equal(x.ravel(), np.arange(4 * T))


def test_ranks_disjoint_and_complete(folder):
    for step in (0, 3):
        one = step_tokens(folder, 1, 4, 4, step)
        r0 = np.concatenate([loader(folder, 4, 2, 0, 2).micro_batch(step, m)[0] for m in range(2)])
        r1 = np.concatenate([loader(folder, 4, 2, 1, 2).micro_batch(step, m)[0] for m in range(2)])
        assert not set(r0.ravel()) & set(r1.ravel())
        assert sorted(np.concatenate([r0, r1]).ravel()) == sorted(one.ravel())


@pytest.mark.parametrize("step", [0, 1, 5, 30])
def test_same_tokens_whatever_world_and_accum(folder, step):
    ref = step_tokens(folder, 1, 4, 4, step)
    for world, B, accum in [(2, 4, 2), (4, 4, 1), (1, 2, 8)]:
        assert np.array_equal(step_tokens(folder, world, B, accum, step).reshape(-1, T), ref)
    if step < 3:
        assert np.array_equal(ref.ravel(), np.arange(step * 16 * T, (step + 1) * 16 * T))


def test_no_token_skipped_at_shard_ends(folder):
    stream = TokenStream(folder, "train")
    assert np.array_equal(stream.read(0, N), np.arange(N))
    dl = loader(folder, B=3, accum=1)
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


@pytest.mark.parametrize("micro_steps", [4, 9, 120])  # 120 micro-steps crosses into epoch 1
def test_exact_resume(folder, micro_steps):
    dl = loader(folder, B=2, accum=2, seed=3)
    for _ in range(micro_steps):
        dl.next_batch()
    state = dl.state_dict()
    expected = [dl.next_batch() for _ in range(6)]
    resumed = loader(folder, B=2, accum=2, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(6))):
        assert np.array_equal(x, rx) and np.array_equal(y, ry)


def test_val_batches_repeat(folder):
    a = list(val_batches(folder, 2, T, val_tokens=100))
    b = list(val_batches(folder, 2, T, val_tokens=100))
    assert len(a) == 100 // (2 * T)
    for (x, y), (bx, by) in zip(a, b):
        assert np.array_equal(x, bx) and np.array_equal(y, by)
    assert np.array_equal(a[0][0].ravel(), np.arange(40000, 40000 + 2 * T))


def test_val_tokens_too_small(folder):
    with pytest.raises(DataError, match="val_tokens"):
        list(val_batches(folder, 4, T, val_tokens=10))


def test_no_train_shards_names_folder(tmp_path):
    write_shard(tmp_path / "t_val_000000.bin", np.arange(100))
    with pytest.raises(DataError, match=str(tmp_path)):
        loader(tmp_path)


def test_next_step_stacks_the_micro_batches(folder):
    a, b = loader(folder, B=2, accum=3), loader(folder, B=2, accum=3)
    for _ in range(2):
        xs, ys = a.next_step()
        assert xs.shape == ys.shape == (3, 2, T)
        for m in range(3):
            x, y = b.next_batch()
            assert np.array_equal(xs[m], x) and np.array_equal(ys[m], y)
