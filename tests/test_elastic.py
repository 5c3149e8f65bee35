"""E-DiT blocks (SPEC sections 1-3) on FLUX and Qwen-Image: dense equivalence, skips, widths,
per-sample decisions, train mode, released routers, and real branching in the compiled forward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.layers import channel_ranks
from edit_jax.elastic.mechanism import ElasticConfig, apply_elastic
from elastic_cases import FAMILIES, Case, forced, relative, take_layers

INFER = ElasticConfig(mode="infer")
FORCED = ElasticConfig(mode="forced")


@pytest.mark.parametrize("settings, message", [
    (dict(tau=1.5), r"tau 1.5 must be in \[0, 1\]"),
    (dict(tau=float("nan")), r"tau nan must be in \[0, 1\]"),
    (dict(delta_margin=-0.01), "cache settings must be >= 0"),
    (dict(cache_start=-1), "cache settings must be >= 0"),
    (dict(mode="sometimes"), "elastic mode 'sometimes' is not one of"),
], ids=["tau-above-one", "tau-nan", "negative-margin", "negative-start", "unknown-mode"])
def test_elastic_settings_out_of_range_are_one_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        ElasticConfig(**settings)


@pytest.mark.parametrize("mode, decisions, message", [
    ("forced", None, "elastic mode 'forced' needs decisions"),
    ("infer", "all-on", r"decisions are read only in elastic mode 'forced' \(and \{'p', 'bucket'\} in mode 'train'\), "
                        "not 'infer'"),
    ("train", "all-on", r"in mode 'train'\), not 'train'"),  # train mode reads a schedule's p, not run flags
    ("forced", "bucket-past-the-last", r"forced bucket must be a width bucket 0..3, got \[4"),
], ids=["forced-without-decisions", "decisions-in-infer", "run-flags-in-train", "bucket-past-the-last"])
def test_forced_decisions_missing_misplaced_or_out_of_range_are_one_clear_error(mode, decisions, message):
    case = Case("flux")
    given = {None: None, "all-on": forced(np.ones(case.num_blocks), np.full(case.num_blocks, 3)),
             "bucket-past-the-last": forced(np.ones(case.num_blocks), np.full(case.num_blocks, 4))}[decisions]
    with pytest.raises(ValueError, match=message):
        case.model.apply({"params": case.params, "routers": case.routers}, **case.arrays, **case.static,
                         elastic=ElasticConfig(mode=mode), decisions=given)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_blocks_forced_on_at_full_width_equals_dense(family):
    case = Case(family)
    out, aux = case.elastic(FORCED, forced(np.ones(case.num_blocks), np.full(case.num_blocks, 3)))
    assert relative(out, case.dense()) <= 1e-6
    assert aux["executed"].all() and (aux["bucket"] == 3).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("decision", ["batch", "sample"])
def test_fresh_routers_keep_every_block_open_at_full_width(family, decision):
    case = Case(family)
    out, aux = case.elastic(ElasticConfig(mode="infer", decision=decision))
    assert relative(out, case.dense()) <= 1e-6
    np.testing.assert_allclose(aux["p"], 0.7, atol=0.01)
    assert (aux["bucket"] == 3).all() and aux["executed"].all()


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_skips_equal_a_dense_model_without_those_blocks(family):
    case = Case(family)
    run = np.ones(case.num_blocks, bool)
    run[0] = run[-1] = False  # FLUX: first double and last single block; Qwen: first and last
    out, aux = case.elastic(FORCED, forced(run, np.full(case.num_blocks, 3)))

    params, changes, start = dict(case.params), {}, 0
    for name, count, _ in case.stacks():
        keep = [i for i in range(count) if run[start + i]]
        params[name] = take_layers(case.params[name], keep)
        changes["num_layers" if name == "transformer_blocks" else "num_single_layers"] = len(keep)
        start += count
    expected = case.dense(params, config=case.config.replace(**changes))
    assert relative(out, expected) <= 1e-6
    assert aux["branch"].tolist() == [0 if not r else 4 for r in run]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bucket", [0, 1, 2])
def test_width_bucket_equals_a_dense_model_with_truncated_elastic_mlps(family, bucket):
    case = Case(family)
    width = case.hidden * (bucket + 1) // 4
    out, _ = case.elastic(FORCED, forced(np.ones(case.num_blocks), np.full(case.num_blocks, bucket)))

    params = jax.tree.map(lambda x: x, case.params)
    kept = channel_ranks(case.hidden, case.config.width_groups) < width  # stored positions of the first channels
    for name, _, path in case.stacks():
        node = params[name]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = node[path[-1]] * kept[None, :, None]
    assert relative(out, case.dense(params)) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_with_different_forced_decisions_equal_each_sample_alone(family):
    case = Case(family)
    rng = np.random.default_rng(0)
    run = rng.random((2, case.num_blocks)) < 0.6
    bucket = rng.integers(0, 4, (2, case.num_blocks))
    run[0, 0], run[1, 0], bucket[:, 1] = True, False, (0, 3)  # make sure the rows disagree

    out, aux = case.elastic(FORCED, forced(run, bucket))

    for b in range(2):
        alone, _ = case.elastic(FORCED, forced(run[b], bucket[b]), arrays=case.row(b))
        assert relative(out[b], alone[0]) <= 1e-6
    np.testing.assert_array_equal(aux["executed"], run)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_infer_equals_each_sample_alone(family):
    case = Case(family)
    routers = jax.tree.map(lambda x: x, case.routers)
    gate = routers["transformer_blocks"]["router"]["gate_head"]
    gate["kernel"] = gate["kernel"] * 3000.0  # routers that read the input strongly: rows disagree
    sample = ElasticConfig(mode="infer", decision="sample")
    out, _ = case.elastic(sample, routers=routers)
    for b in range(2):
        alone, _ = case.elastic(sample, routers=routers, arrays=case.row(b))
        assert relative(out[b], alone[0]) <= 1e-6


def steered_routers(case):
    """Routers that skip block 0 and run block 1 at bucket 1 (p and q saturated)."""
    routers = jax.tree.map(lambda x: x, case.routers)
    r = routers["transformer_blocks"]["router"]
    r["gate_head"]["bias"] = r["gate_head"]["bias"].at[0].set(-8.0)
    r["width_head"]["bias"] = r["width_head"]["bias"].at[1].set(jnp.asarray([0.0, 6.0, 0.0, 0.0]))
    return routers


@pytest.mark.parametrize("family", FAMILIES)
def test_train_forward_value_equals_infer_for_the_same_decisions(family):
    case = Case(family)
    routers = steered_routers(case)
    train, train_aux = case.elastic(ElasticConfig(mode="train"), routers=routers)
    infer, infer_aux = case.elastic(ElasticConfig(mode="infer", decision="sample"), routers=routers)
    assert not infer_aux["executed"][:, 0].any() and (infer_aux["bucket"][:, 1] == 1).all()
    np.testing.assert_array_equal(train_aux["executed"], infer_aux["executed"])
    assert relative(train, infer) <= 1e-6


def router_loss(case, params, routers, freeze_base):
    out, aux = apply_elastic(case.model, params, routers, **case.arrays, **case.static,
                             elastic=ElasticConfig(mode="train"), freeze_base=freeze_base)
    return jnp.mean(out**2) + jnp.mean(aux["p"]) ** 2


@pytest.mark.parametrize("family", FAMILIES)
def test_train_gradients_reach_every_router_param_and_not_frozen_base(family):
    case = Case(family)
    routers = steered_routers(case)
    g_params, g_routers = jax.jit(jax.grad(lambda p, r: router_loss(case, p, r, True), argnums=(0, 1)))(case.params, routers)

    for path, g in jax.tree_util.tree_flatten_with_path(g_routers)[0]:
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(g_params))
    g_unfrozen = jax.jit(jax.grad(lambda p: router_loss(case, p, routers, False)))(case.params)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(g_unfrozen))


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_forward_really_branches_with_sliced_weights(family):
    case = Case(family)
    jaxpr = str(jax.make_jaxpr(lambda r: case.elastic(INFER, routers=r)[0])(case.routers))
    d, m = case.config.inner_dim, case.hidden
    assert "cond[" in jaxpr
    for k in range(1, 4):
        w = m * k // 4
        assert f"f32[{d},{w}]" in jaxpr and f"f32[{w},{d}]" in jaxpr, w  # fc1 and fc2 slices


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _primitives(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, its sub-jaxprs included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _subjaxprs(eqn):
            names |= _primitives(sub)
    return names


def _block_scans(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and any(e.primitive.name == "cond" for e in eqn.params["jaxpr"].jaxpr.eqns):
            yield eqn
        for sub in _subjaxprs(eqn):
            yield from _block_scans(sub)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_skipped_block_never_reads_its_weights(family):
    case = Case(family)
    closed = jax.make_jaxpr(lambda r: case.elastic(INFER, routers=r)[0])(case.routers)
    scans = list(_block_scans(closed.jaxpr))
    assert len(scans) == len(case.stacks())
    for eqn, (name, count, _) in zip(scans, case.stacks()):
        stacked = {tuple(x.shape) for x in jax.tree.leaves(case.params[name])}
        xs = eqn.invars[eqn.params["num_consts"] + eqn.params["num_carry"]:]
        assert not stacked & {tuple(v.aval.shape) for v in xs}, "weights sliced by the scan itself"
        (cond,) = [e for e in eqn.params["jaxpr"].jaxpr.eqns if e.primitive.name == "cond"]
        skip, *runs = cond.params["branches"]
        assert not _primitives(skip.jaxpr) & {"dynamic_slice", "gather"}
        assert all(_primitives(run.jaxpr) & {"dynamic_slice", "gather"} for run in runs)


def _dots(jaxpr, into_scans: bool):
    """Every dot_general eqn of a jaxpr and its sub-jaxprs (those of scans only if into_scans)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        if eqn.primitive.name != "scan" or into_scans:
            for sub in _subjaxprs(eqn):
                yield from _dots(sub, into_scans)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_routers_temb_only_half_runs_once_per_stack_ahead_of_the_block_scans(family):
    case = Case(family)
    closed = jax.make_jaxpr(lambda r: case.elastic(INFER, routers=r)[0])(case.routers)
    d, h = case.config.inner_dim, case.config.router_hidden

    ahead = [v.aval.shape for e in _dots(closed.jaxpr, into_scans=False) for v in e.invars]
    counts = [count for _, count, _ in case.stacks()]
    single_blocks_own = [case.config.num_single_layers] if family == "flux" else []  # their AdaLN is D x 3D too
    assert sorted(s[0] for s in ahead if s[1:] == (d, 3 * d)) == sorted(counts + single_blocks_own)  # modulation kernels
    assert [s[0] for s in ahead if s[1:] == (d, h)] == counts  # proj kernels
    for scan in _block_scans(closed.jaxpr):
        in_router = [e for e in _dots(scan.params["jaxpr"].jaxpr, into_scans=True)
                     if "elastic_router" in str(e.source_info.name_stack)]
        kernels = {v.aval.shape for e in in_router for v in e.invars if v.aval.ndim == 2}
        assert in_router and not kernels & {(d, 2 * d), (d, 3 * d), (d, h)}  # none read in the scan


def modulations_of(case, routers, arrays=None):
    from edit_jax.models.registry import router_modulations

    arrays = dict(arrays or case.arrays)
    timestep = arrays.pop("timestep")
    return router_modulations(case.config, case.params, routers, timestep, {**arrays, **case.static})


@pytest.mark.parametrize("family", FAMILIES)
def test_router_modulations_computed_ahead_give_the_routed_call_it_would_compute(family):
    case = Case(family)
    routers = jax.tree.map(lambda x: x, case.routers)
    routers["transformer_blocks"]["router"]["gate_head"]["kernel"] *= 3000.0  # p depends on the modulation

    variables = {"params": case.params, "routers": routers}
    own, own_aux = jax.jit(lambda v, x: case.model.apply(v, **x, **case.static, elastic=INFER))(variables, case.arrays)
    ahead, ahead_aux = jax.jit(lambda v, x, m: case.model.apply(v, **x, **case.static, elastic=INFER,
                                                                  router_modulations=m))(
        variables, case.arrays, modulations_of(case, routers))

    assert relative(ahead, own) <= 1e-6
    np.testing.assert_allclose(ahead_aux["p"], own_aux["p"], rtol=1e-6)
    np.testing.assert_allclose(ahead_aux["q"], own_aux["q"], rtol=1e-6)


def test_router_modulations_for_another_batch_are_a_clear_error():
    case = Case("flux")
    one_row = modulations_of(case, case.routers, case.row(0))
    with pytest.raises(ValueError, match=r"router_modulations\[0\] has shape \(2, 1, 64\), expected \[2, 2, 64\]"):
        case.model.apply({"params": case.params, "routers": case.routers}, **case.arrays, **case.static,
                         elastic=INFER, router_modulations=one_row)


def test_router_modulations_where_no_router_runs_are_a_clear_error():
    case = Case("qwen-image")
    with pytest.raises(ValueError, match="router_modulations were given, but elastic mode 'forced' runs no router"):
        case.model.apply({"params": case.params, "routers": case.routers}, **case.arrays, **case.static,
                         elastic=FORCED, router_modulations=modulations_of(case, case.routers))


def block_modulations_of(case, arrays=None):
    from edit_jax.models.registry import block_modulations

    arrays = dict(arrays or case.arrays)
    timestep = arrays.pop("timestep")
    return block_modulations(case.config, case.params, timestep, {**arrays, **case.static})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("elastic", [None, INFER], ids=["dense", "infer"])
def test_block_modulations_computed_ahead_give_the_call_it_would_compute(family, elastic):
    case = Case(family)
    variables = {"params": case.params} if elastic is None else {"params": case.params, "routers": case.routers}
    run = jax.jit(lambda mods: case.model.apply(variables, **case.arrays, **case.static, elastic=elastic,
                                                 block_modulations=mods))

    own, ahead = run(None), run(block_modulations_of(case))

    for a, b in zip(jax.tree.leaves(ahead), jax.tree.leaves(own)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_block_modulations_for_another_batch_are_a_clear_error():
    case = Case("qwen-image")
    one_row = block_modulations_of(case, case.row(0))
    with pytest.raises(ValueError, match=r"block_modulations\[0\]\['img_mod'\] has shape \(3, 1, 192\), expected \[3, 2, 192\]"):
        case.model.apply({"params": case.params}, **case.arrays, **case.static, block_modulations=one_row)


def test_block_modulations_of_another_model_are_a_clear_error():
    case = Case("flux")
    double_only = block_modulations_of(case)[:1]
    with pytest.raises(ValueError, match=r"block_modulations holds 1 entries, expected one per block stack \(2\)"):
        case.model.apply({"params": case.params}, **case.arrays, **case.static, block_modulations=double_only)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("elastic", [None, INFER], ids=["dense", "infer"])
def test_the_blocks_own_modulations_run_once_per_stack_ahead_of_the_block_scans(family, elastic):
    case = Case(family)
    fn = (lambda p: case.dense(params=p)) if elastic is None else (lambda p: case.elastic(elastic, params=p)[0])
    closed = jax.make_jaxpr(fn)(case.params)
    d, layers = case.config.inner_dim, case.config.num_layers

    ahead = [v.aval.shape for e in _dots(closed.jaxpr, into_scans=False) for v in e.invars]
    assert [s[0] for s in ahead if s[1:] == (d, 6 * d)] == [layers, layers]  # image and text stream AdaLN
    in_scans = [str(e.source_info.name_stack) for scan in _block_scans(closed.jaxpr) if elastic is not None
                for e in _dots(scan.params["jaxpr"].jaxpr, into_scans=True)]
    in_scans += [str(e.source_info.name_stack) for e in _dots(closed.jaxpr, into_scans=True)
                 if "forward" in str(e.source_info.name_stack)]
    assert in_scans and not [n for n in in_scans if re.search(r"/(norm1|norm1_context|norm|img_mod|txt_mod)(/|$)", n)]


def test_forced_decisions_of_the_wrong_shape_are_a_clear_error():
    case = Case("qwen-image")
    with pytest.raises(ValueError, match=r"forced (run|bucket) has shape \(2,\), expected \[3\] or \[2, 3\]"):
        case.elastic(FORCED, forced([1, 1], [0, 0]))


def test_unknown_elastic_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="elastic mode 'fast'"):
        ElasticConfig(mode="fast")


def numpy_router(w: dict, x: np.ndarray, valid: np.ndarray, temb: np.ndarray):
    """SPEC section 1 in plain NumPy with PyTorch-layout weights ([out, in]); returns p, q."""
    silu = temb / (1 + np.exp(-temb))
    shift, scale, _ = np.split(silu @ w["img_mod.1.weight"].T + w["img_mod.1.bias"], 3, axis=-1)
    mean = x.mean(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    h = np.maximum(((1 + scale[:, None]) * normed + shift[:, None]) @ w["out.0.weight"].T + w["out.0.bias"], 0)
    weights = valid / valid.sum(1, keepdims=True)
    gate = np.einsum("bl,bl->b", weights, (h @ w["out.2.weight"].T + w["out.2.bias"])[..., 0])
    widths = np.einsum("bl,blk->bk", weights, h @ w["width_head.weight"].T + w["width_head.bias"])
    q = np.exp(widths - widths.max(-1, keepdims=True))
    return 1 / (1 + np.exp(-gate)), q / q.sum(-1, keepdims=True)


def test_released_routers_give_the_p_and_q_of_spec_section_1(tmp_path):
    from edit_jax.checkpoints_convert import convert_checkpoint
    from edit_jax.checkpoint import load_routers
    from edit_jax.config import from_diffusers_config
    from edit_jax.elastic.router import Router
    from reference import make_diffusers_qwen
    from test_qwen_image import fake_release

    torch_model = make_diffusers_qwen()
    sd = fake_release(torch_model, tmp_path / "model.safetensors", scale=0.05)
    config = from_diffusers_config(dict(torch_model.config), "qwen-image")
    ckpt = convert_checkpoint("qwen-image", tmp_path / "model.safetensors", tmp_path / "ckpt",
                              config=config, dtype="float32", progress=False)
    routers = load_routers(ckpt)["transformer_blocks"]["router"]
    rng = np.random.default_rng(0)
    d = config.inner_dim
    txt, img, temb = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, d), (2, 6, d), (2, d)))
    txt_valid = np.ones((2, 5), bool)
    txt_valid[1, 2:4] = False

    for i in range(config.num_layers):
        layer = jax.tree.map(lambda x: x[i], routers)
        gate, widths = Router(128, 4, config.runtime).apply(
            {"routers": layer}, [(txt, txt_valid), (img, None)], temb
        )
        weights = {k[len(f"gate_mlps.{i}."):]: v.numpy().astype(np.float64) for k, v in sd.items() if k.startswith(f"gate_mlps.{i}.")}
        p, q = numpy_router(weights, np.concatenate([txt, img], 1).astype(np.float64),
                            np.concatenate([txt_valid, np.ones((2, 6), bool)], 1).astype(np.float64), temb.astype(np.float64))
        np.testing.assert_allclose(jax.nn.sigmoid(gate), p, rtol=1e-5)
        np.testing.assert_allclose(jax.nn.softmax(widths), q, rtol=1e-5, atol=1e-7)


def test_the_flux_single_block_projects_attention_and_mlp_without_concatenating_them():
    case = Case("flux")
    closed = jax.make_jaxpr(lambda r: case.elastic(INFER, routers=r)[0])(case.routers)
    cfg = case.config
    wide = [s for s in _shapes_of(closed.jaxpr, "concatenate") if len(s) == 3 and s[-1] > cfg.inner_dim]
    assert not wide, wide  # no [B, L, D + width] input to proj_out is ever written


def _shapes_of(jaxpr, primitive: str):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            yield from (tuple(v.aval.shape) for v in eqn.outvars)
        for sub in _subjaxprs(eqn):
            yield from _shapes_of(sub, primitive)
