"""Router kinds on constructed statistics: ridge equals a direct ridge fit on the pooled data,
centroids are the normalised means, random rows belong to their source, learned rows are
stacked as trained, base experts keep their mutual routing; the report flags parallel rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from moesaic.routing import contrast, registry, report
from moesaic.routing.ridge import solve_layer

L, D = 2, 6


def class_data(seed, n=300, classes=3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, D)) * 3
    return [centres[c] + rng.standard_normal((L, n, D)) for c in range(classes)], centres


def inputs_from(xs, *, public=True, base_rows=None, options=None, rows=None, base_bias=None):
    """xs[0] is public data, xs[1:] the parties."""
    def stat(x, name, layer):
        xl = x[layer]
        return {"x_sum": xl.sum(0), "xtx": xl.T @ xl, "mean_hidden": xl.mean(0)}[name]
    parties = xs[1:]
    eb = 1 if base_rows is None else base_rows.shape[1]
    sources = (["public"] if eb == 1 else [f"public_{j}" for j in range(eb)])
    sources += [f"p{i}" for i in range(len(parties))]
    rows = rows if rows is not None else [np.full((L, D), i + 1.0) for i in range(len(parties))]
    return registry.RouterInputs(
        n_layers=L, d_model=D, sources=sources, base_experts=eb, base_rows=base_rows,
        base_bias=base_bias, party_rows=lambda i: rows[i], party_bias=lambda i: -np.ones(L) * i,
        party_stat=lambda i, s, layer: stat(parties[i], s, layer),
        party_tokens=[x.shape[1] for x in parties],
        public_stat=(lambda s, layer: stat(xs[0], s, layer)) if public else None,
        public_tokens=xs[0].shape[1], options=options or {})


def test_ridge_equals_direct_fit_and_separates_classes():
    xs, _ = class_data(0)
    lam_rel = 1e-2
    router = registry.get("ridge")(inputs_from(xs, options={"ridge_lambda": lam_rel}))
    for layer in range(L):
        x = np.concatenate([c[layer] for c in xs])
        y = np.repeat(np.eye(3), [c.shape[1] for c in xs], axis=0)
        alpha = lam_rel * np.trace(x.T @ x) / D
        fit = Ridge(alpha=alpha, fit_intercept=False, solver="cholesky").fit(x, y)
        np.testing.assert_allclose(router.rows[layer], fit.coef_, rtol=1e-4, atol=1e-6)
        accuracy = np.mean(np.argmax(x @ router.rows[layer].T, axis=1) == np.argmax(y, axis=1))
        assert accuracy > 0.95
    np.testing.assert_array_equal(router.bias, 0)


def test_ridge_needs_public_stats():
    xs, _ = class_data(1)
    with pytest.raises(ValueError, match="--public-stats"):
        registry.get("ridge")(inputs_from(xs, public=False))


def test_solve_layer_sums_classes_in_float64():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((50, D)), rng.standard_normal((70, D))
    rows = solve_layer([a.T @ a, b.T @ b], [a.sum(0), b.sum(0)], 0.0)
    x = np.concatenate([a, b])
    y = np.repeat(np.eye(2), [50, 70], axis=0)
    np.testing.assert_allclose(rows, np.linalg.lstsq(x, y, rcond=None)[0].T, atol=1e-8)


def test_centroid_rows_are_normalised_means():
    xs, _ = class_data(3)
    with_public = registry.get("centroid")(inputs_from(xs))
    for e, x in enumerate(xs):
        mean = x.mean(axis=1)
        np.testing.assert_allclose(with_public.rows[:, e],
                                   mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                                   rtol=1e-5)
    without = registry.get("centroid")(inputs_from(xs, public=False))
    parties = without.rows[:, 1:].astype(np.float64)
    expected = parties.mean(axis=1)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(without.rows[:, 0], expected, rtol=1e-5)
    assert "mean of the parties" in without.inputs["public"]


def test_moe_base_keeps_its_own_routing_among_base_experts():
    """Rows centred and the base's biases kept: the base experts' logits differ from the base
    router's by one shift per token, so the base's choice among them is unchanged."""
    xs, _ = class_data(4)
    base_rows = np.random.default_rng(5).standard_normal((L, 3, D)).astype(np.float32)
    base_bias = np.array([[0.3, -0.5, -1.0], [0.0, -2.0, -0.1]], np.float32)
    for kind in ("centroid", "ridge", "contrast"):
        router = registry.get(kind)(inputs_from(xs, base_rows=base_rows, base_bias=base_bias))
        assert router.rows.shape == (L, 3 + 2, D)
        np.testing.assert_array_equal(router.bias[:, :3], base_bias)
        x = np.random.default_rng(6).standard_normal((10, D))
        for layer in range(L):
            got = x @ router.rows[layer, :3].T + np.minimum(router.bias[layer, :3], 0)
            want = x @ base_rows[layer].T + np.minimum(base_bias[layer], 0)
            np.testing.assert_allclose(got - got[:, :1], want - want[:, :1], rtol=1e-4,
                                       atol=1e-4)


def test_base_rows_within_gives_no_rows_without_base_experts():
    inputs = inputs_from(class_data(9)[0])
    inputs.base_experts, inputs.sources = 0, inputs.sources[1:]
    assert registry.base_rows_within(inputs, np.ones((L, D))).shape == (L, 0, D)


def test_random_rows_depend_on_source_not_slot():
    xs, _ = class_data(7)
    a = registry.get("random")(inputs_from(xs, options={"seed": 3}))
    b = registry.get("random")(inputs_from([xs[0], xs[2]], options={"seed": 3}))
    # p1 in the first is slot 2, in the second p0 is slot 1 but a different source
    np.testing.assert_array_equal(a.rows[:, 0], b.rows[:, 0])  # public unchanged
    assert not np.array_equal(a.rows[:, 1], a.rows[:, 2])
    c = registry.get("random")(inputs_from(xs, options={"seed": 4}))
    assert not np.array_equal(a.rows, c.rows)
    np.testing.assert_allclose(a.rows.std(), D ** -0.5, rtol=0.5)


def test_learned_rows_stack_as_trained():
    xs, _ = class_data(8)
    rows = [np.random.default_rng(i).standard_normal((L, D)) for i in range(2)]
    router = registry.get("learned-rows")(inputs_from(xs, rows=rows))
    np.testing.assert_array_equal(router.rows[:, 0], 0)
    np.testing.assert_allclose(router.rows[:, 1], rows[0], rtol=1e-6)
    np.testing.assert_array_equal(router.bias[:, 2], -1)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown router kind 'nope'"):
        registry.get("nope")


def test_report_flags_parallel_rows():
    orthogonal = np.eye(3, D)[None].repeat(2, axis=0)
    reports, warnings = report.routing_report(orthogonal, ["a", "b", "c"])
    assert warnings == [] and reports[0]["condition_number"] == pytest.approx(1.0)
    assert reports[0]["max_cosine"] == pytest.approx(0.0)
    parallel = orthogonal.copy()
    parallel[1, 2] = parallel[1, 1] * 1.001
    reports, warnings = report.routing_report(parallel, ["a", "b", "c"])
    assert len(warnings) == 1 and "layer 1" in warnings[0] and "'b' and 'c'" in warnings[0]
    assert reports[1]["condition_number"] > 1e3
    # an affine combination of the others cannot be preferred cleanly, parallel or not
    affine = orthogonal.copy()
    affine[1, 2] = 2 * affine[1, 1] - affine[1, 0] + 1e-4 * np.eye(D)[3]
    reports, warnings = report.routing_report(affine, ["a", "b", "c"])
    assert warnings == [] and reports[1]["condition_number"] > 1e3


def test_report_condition_ignores_a_shared_shift():
    """A zero public row (learned-rows over a dense base, contrast) is not singular: softmax
    ignores a shift all rows share, and so does the condition number."""
    rows = np.zeros((1, 3, D))
    rows[0, 1, 0], rows[0, 2, 1] = 1.0, 2.0
    (zero_public,), _ = report.routing_report(rows, ["public", "a", "b"])
    (shifted,), _ = report.routing_report(rows + np.arange(D), ["public", "a", "b"])
    assert np.isfinite(zero_public["condition_number"]) and zero_public["condition_number"] < 5
    assert shifted["condition_number"] == pytest.approx(zero_public["condition_number"])


def test_contrast_rows_score_the_margin_against_the_public_expert():
    xs, centres = class_data(3, classes=4)
    built = registry.get("contrast")(inputs_from(xs, options={"margin": 3.0}))
    assert built.rows.shape == (L, 4, D) and np.all(built.rows[:, 0] == 0)
    assert np.all(built.bias[:, 0] == 0) and np.all(built.bias <= 0)
    for layer in range(L):
        means = [x[layer].mean(0) for x in xs]
        for party in (1, 2, 3):
            score = built.rows[layer, party] @ means[party] + built.bias[layer, party]
            public = built.rows[layer, party] @ means[0] + built.bias[layer, party]
            np.testing.assert_allclose(score - public, 6.0, rtol=1e-4)  # 2 * margin
            assert score > 0 > public  # own expert beats public on own data, not on public
    shifted = registry.get("contrast")(inputs_from(xs, options={"margin": 3.0,
                                                               "selectivity": 1.5}))
    np.testing.assert_allclose(shifted.bias[:, 1:], built.bias[:, 1:] - 1.5, rtol=1e-6)
    with pytest.raises(ValueError, match="public data"):
        registry.get("contrast")(inputs_from(xs, public=False))


def test_contrast_keeps_the_margin_where_the_bias_clamp_would_bind():
    """A party mean shorter than the public one along the boundary needs a positive bias, which
    the model clamps to 0; the row is then rebuilt so both scores still hold, with bias 0."""
    rng = np.random.default_rng(0)
    public = rng.standard_normal((3, D)) * 4
    own = 0.4 * public + 0.5 * rng.standard_normal((3, D))
    own[0] = public[0] + rng.standard_normal(D)  # layer 0: no clamp needed
    row, bias = contrast.contrast_rows(own, public, margin=2.0)
    assert np.all(bias <= 0) and bias[0] < 0 and np.all(bias[1:] == 0)
    effective = np.minimum(bias, 0)  # what the model applies
    np.testing.assert_allclose(np.sum(row * own, -1) + effective, 2.0, atol=1e-9)
    np.testing.assert_allclose(np.sum(row * public, -1) + effective, -2.0, atol=1e-9)


def test_stats_rows_are_whole_batches_and_count_only_their_documents(tmp_path):
    """A short split: `collect` sums whole batches only, so the rows (and the documents
    counted from them) are cut to whole batches first."""
    from moesaic.data.loader import packed_rows
    from moesaic.data.prepare import write_source
    from moesaic.data.tokenizer import BYTES
    from moesaic.routing import stats

    docs = [f"document number {i} " + "x" * 10 for i in range(10)]
    write_source(tmp_path, "p", {"train": lambda: docs, "heldout": lambda: docs[:2]},
                 tokenizer=BYTES, origin={"kind": "test"})
    every, n_every = stats.stats_sequences(tmp_path, "p", seq_len=30, max_sequences=64)
    rows, n_docs = stats.stats_sequences(tmp_path, "p", seq_len=30, max_sequences=64,
                                         batch_rows=4)
    assert len(every) == 9 and len(rows) == 8  # what collect(batch_rows=4) sums, all of it
    picked, _, n_picked = packed_rows(tmp_path, "p", "train", width=30, max_rows=8)
    np.testing.assert_array_equal(rows, picked)
    assert n_docs == n_picked  # the documents of those rows, not of the nine
