"""Quantizers (index -> code round trips, nearest-code search) and the codebook statistics."""

import math

import pytest
import torch

from vqlog import metrics
from vqlog.model.quantizer import (
    FSQ,
    FSQ_LEVELS,
    VQ,
    EMAVQ,
    Identity,
    QuantizerOutput,
    build_quantizer,
    fsq_levels,
    SEARCH_BLOCK,
    nearest_code,
)
from vqlog.model.reference import nearest_code_reference

QUANTIZERS = ["vq", "vq_ema", "fsq", "none"]


def latents(B=4, T=8, D=8, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- nearest code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M, K, D", [(1, 2, 1), (7, 3, 5), (64, 16, 8), (300, 256, 32)])
def test_nearest_code_matches_the_reference(M, K, D, dtype):
    g = torch.Generator().manual_seed(M * 1000 + K)
    z = torch.randn(M, D, generator=g, dtype=dtype)
    codebook = torch.randn(K, D, generator=g, dtype=dtype)
    fast, ref = nearest_code(z, codebook), nearest_code_reference(z, codebook)
    assert fast.shape == ref.shape == (M,)
    if dtype == torch.float64:
        assert torch.equal(fast, ref)
    else:  # float32 rounding may flip a near-tie; the chosen code must then be as near
        dist = ((z[:, None].double() - codebook[None].double()) ** 2).sum(-1)  # (M K)
        rows = torch.arange(M)
        torch.testing.assert_close(dist[rows, fast], dist[rows, ref], rtol=1e-5, atol=1e-5)
        assert (fast == ref).float().mean() > 0.99


@pytest.mark.parametrize("M", [256, 1000])
def test_nearest_code_in_blocks_of_rows_matches_the_reference(M):
    # K 2048: the CPU search goes 256 rows at a time, so 1000 rows end in a shorter block
    g = torch.Generator().manual_seed(M)
    z = torch.randn(M, 16, generator=g, dtype=torch.float64)
    codebook = torch.randn(2048, 16, generator=g, dtype=torch.float64)
    assert SEARCH_BLOCK // 2048 == 256  # one whole block, or three and a shorter one
    assert torch.equal(nearest_code(z, codebook), nearest_code_reference(z, codebook))


def test_nearest_code_of_a_nan_row_is_a_valid_index():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=g)
    codebook = torch.randn(10, 4, generator=g)
    z[2, 1] = float("nan")
    fast = nearest_code(z, codebook)
    assert 0 <= int(fast[2]) < 10  # a code of the codebook, so the gather that follows works
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert torch.equal(fast[keep], nearest_code_reference(z[keep], codebook))


def test_nearest_code_takes_no_rows_and_tensors_that_want_gradients():
    codebook = torch.randn(8, 4, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert nearest_code(torch.empty(0, 4), codebook.detach()).shape == (0,)
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ref = nearest_code_reference(z.detach(), codebook.detach())
    assert torch.equal(nearest_code(z, codebook), ref)


def test_nearest_code_finds_codes_placed_exactly():
    codebook = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([3, 0, 15, 3, 7])
    assert torch.equal(nearest_code(codebook[idx] + 1e-4, codebook), idx)


def test_nearest_code_takes_the_first_of_equal_codes():
    # codes 2, 5 and 9 are the same vector: every row near it gets 2, as the reference's argmin
    codebook = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    codebook[5] = codebook[9] = codebook[2]
    z = codebook[[2, 5, 9, 0]] + 1e-3
    assert nearest_code(z, codebook).tolist() == [2, 2, 2, 0]
    assert torch.equal(nearest_code(z, codebook), nearest_code_reference(z, codebook))


def test_twin_codes_map_to_the_first_and_codes_of_equal_norm_stay_apart():
    from vqlog.model.quantizer import first_of_equal_codes

    codebook = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    codebook[[40, 7, 299]] = codebook[120].clone()  # twins before and after the code they copy
    codebook[9] = torch.zeros(16)
    codebook[10] = torch.zeros(16)
    codebook[11, :] = 0.0
    codebook[11, :2] = torch.tensor([1.0, 2.0])
    codebook[12, :] = 0.0
    codebook[12, :2] = torch.tensor([2.0, 1.0])  # the same norm as code 11, another vector
    first = first_of_equal_codes(codebook)
    assert first[[7, 40, 120, 299]].tolist() == [7, 7, 7, 7]
    assert first[[9, 10, 11, 12]].tolist() == [9, 9, 11, 12]
    untouched = torch.ones(300, dtype=torch.bool)
    untouched[[40, 120, 299, 10]] = False
    assert torch.equal(first[untouched], torch.arange(300)[untouched])
    z = codebook[torch.randint(0, 300, (500,), generator=torch.Generator().manual_seed(4))]
    assert torch.equal(nearest_code(z + 1e-4, codebook), nearest_code_reference(z + 1e-4, codebook))
    same = torch.randn(1, 8).repeat(64, 1)  # a codebook of one vector: every row gets code 0
    assert nearest_code(torch.randn(100, 8), same).eq(0).all()


def test_a_diverged_codebook_still_gets_indices_in_range():
    # A NaN code (a step that diverged on a GPU, where fit does not check every step) sorts last;
    # its norm must not be searched one past the end (on a GPU, a device-side assert).
    from vqlog.model.quantizer import first_of_equal_codes

    codebook = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    codebook[[3, 31]] = float("nan")
    first = first_of_equal_codes(codebook)
    assert first.tolist() == list(range(32))  # NaN equals nothing, not even itself
    all_nan = torch.full((32, 8), float("nan"))
    assert first_of_equal_codes(all_nan).tolist() == list(range(32))
    for book in (codebook, all_nan):
        idx = nearest_code(torch.randn(200, 8), book)
        assert ((idx >= 0) & (idx < 32)).all()


# --------------------------------------------------------------------------- index -> code


def test_vq_indices_map_back_to_codes():
    q = VQ(dim=8, codebook_size=16, commitment=0.25)
    with torch.no_grad():
        q.codebook.normal_()  # spread the codes so that many are used
    z = latents()
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.indices.shape == (4, 8) and out.indices.dtype == torch.long
    torch.testing.assert_close(out.z_q, q.codebook[out.indices])
    assert torch.equal(out.indices.reshape(-1),
                       nearest_code_reference(z.reshape(-1, 8), q.codebook.detach()))
    assert out.indices.unique().numel() > 1


def test_vq_losses_weight_the_commitment():
    q = VQ(dim=8, codebook_size=16, commitment=0.25)
    out = q(latents())
    e = q.codebook[out.indices]
    commitment = ((latents() - e) ** 2).mean()
    torch.testing.assert_close(out.commitment, commitment.detach())
    torch.testing.assert_close(out.loss, 1.25 * commitment)  # codebook term + beta * commitment


@pytest.mark.parametrize("training", [True, False])
def test_vq_ema_returns_the_codes_of_its_indices(training):
    torch.manual_seed(0)
    q = EMAVQ(dim=8, codebook_size=16, commitment=0.25)
    z = latents(B=4, T=16)
    q(z)  # first call: k-means init on this batch
    q.train(training)
    codebook = q.vq.codebook.detach().clone()  # (K D); a training call updates it after the lookup
    out = q(z)
    assert out.indices.shape == (4, 16)
    assert 0 <= out.indices.min() and out.indices.max() < q.codebook_size == 16
    # Rotation trick (training): a rotation of z that lands on the code, equal up to rounding.
    torch.testing.assert_close(out.z_q, codebook[out.indices], rtol=1e-4, atol=1e-5)
    if not training:
        torch.testing.assert_close(out.z_q, q.vq.get_output_from_indices(out.indices))
        torch.testing.assert_close(out.z_q, q.vq.get_codes_from_indices(out.indices))


@pytest.mark.parametrize("dim, embedding_num", [(8, 8), (8, 16), (8, 64), (8, 256), (3, 128), (16, 1024)])
def test_fsq_indices_to_codes_round_trip(dim, embedding_num):
    torch.manual_seed(0)
    q = FSQ(dim=dim, embedding_num=embedding_num)
    z = 2 * latents(D=dim)
    out = q(z)
    assert out.indices.shape == (4, 8) and out.indices.dtype == torch.long
    assert 0 <= out.indices.min() and out.indices.max() < q.codebook_size
    assert q.codebook_size == math.prod(q.levels) == q.fsq.codebook_size
    # indices -> level codes -> project_out must be exactly what forward returned
    torch.testing.assert_close(out.z_q, q.fsq.indices_to_codes(out.indices))
    assert out.loss.item() == 0 and out.commitment.item() == 0


def test_none_returns_z_unchanged():
    z = latents()
    out = Identity()(z)
    assert out.z_q is z and out.indices is None
    assert out.loss.item() == 0 and Identity.codebook_size == 0


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_build_quantizer_shapes_and_finite_scalar_losses(quantizer, tiny):
    torch.manual_seed(0)
    q = build_quantizer(tiny(quantizer=quantizer))
    z = latents()
    out = q(z)
    assert out.z_q.shape == z.shape
    assert out.loss.shape == () and out.commitment.shape == ()
    assert torch.isfinite(out.loss) and torch.isfinite(out.commitment)
    assert out.loss.item() >= 0 and out.commitment.item() >= 0
    if quantizer == "none":
        assert out.indices is None
    else:
        assert out.indices.shape == z.shape[:2]
        assert out.indices.max() < q.codebook_size


# --------------------------------------------------------------------------- FSQ levels


@pytest.mark.parametrize("size, levels", sorted(FSQ_LEVELS.items()))
def test_fsq_levels_of_a_table_size_is_its_row(size, levels):
    assert fsq_levels(size) == levels
    assert 2 not in levels  # the library needs preserve_symmetry for a level of 2


@pytest.mark.parametrize("embedding_num", [8, 12, 16, 24, 32, 48, 64, 100, 200, 300, 700, 1500,
                                           3000, 4096, 5000])
def test_fsq_levels_product_is_the_closest_on_a_log_scale(embedding_num):
    product = math.prod(fsq_levels(embedding_num))
    gap = abs(math.log(product / embedding_num))
    assert gap <= min(abs(math.log(math.prod(lv) / embedding_num)) for lv in FSQ_LEVELS.values())
    assert gap < math.log(1.6)  # within the table's range the codebook is near what was asked


# --------------------------------------------------------------------------- codebook statistics


@pytest.mark.parametrize("K", [1, 2, 7, 256])
def test_perplexity_of_a_uniform_histogram_is_K(K):
    assert metrics.perplexity(torch.full((K,), 5.0, dtype=torch.float64)) == pytest.approx(K)


@pytest.mark.parametrize("K", [1, 4, 64])
def test_perplexity_of_one_code_is_one(K):
    counts = torch.zeros(K, dtype=torch.float64)
    counts[K // 2] = 10
    assert metrics.perplexity(counts) == pytest.approx(1.0)


def test_perplexity_is_between_one_and_the_codes_used():
    counts = torch.tensor([8.0, 1.0, 1.0, 0.0])
    assert 1 < metrics.perplexity(counts) < 3
    p = torch.tensor([0.8, 0.1, 0.1])
    assert metrics.perplexity(counts) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


@pytest.mark.parametrize("counts", [torch.zeros(8, dtype=torch.float64), torch.zeros(0)])
def test_perplexity_of_an_empty_histogram_is_nan(counts):
    assert math.isnan(metrics.perplexity(counts))


@pytest.mark.parametrize(
    "counts, used, dead",
    [([1, 0, 3, 0], 0.5, 2), ([5, 5, 5, 5], 1.0, 0), ([0, 0, 9, 0], 0.25, 3), ([0, 0], 0.0, 2)],
)
def test_usage_and_dead_codes(counts, used, dead):
    c = torch.tensor(counts, dtype=torch.float64)
    assert metrics.usage(c) == used
    assert metrics.dead_codes(c) == dead


def test_code_histogram_counts_every_position():
    indices = torch.tensor([[0, 2, 2], [5, 2, 0]])
    h = metrics.code_histogram(indices, codebook_size=6)
    assert h.dtype == torch.float64
    assert h.tolist() == [2, 0, 3, 0, 0, 1]
