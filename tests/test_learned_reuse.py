"""Learned reuse (issue 34): E-DiT's routers choosing compute or reuse. A closed block adds its residual
from its last computed step instead of being the identity; the routers train on rolled-out
trajectories of the sampler's own steps against the dense model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from elastic_cases import Case
from test_cache import run_steps, scripted_probabilities

import edit_jax
from edit_jax.checkpoint import load_routers, router_mode, save, step_schedule
from edit_jax.cli import main
from edit_jax.config import ConfigError
from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import TaylorSeer
from edit_jax.models.registry import init_cache, init_variables
from edit_jax.sampling.sampler import SamplerConfig, default_scheduler, sample
from edit_jax.sampling.schedules import flow_match_schedule
from edit_jax.sampling.step_schedule import learned_schedule
from edit_jax.train.config import TrainConfig
from edit_jax.train.data import shared_inputs, synthetic_batch
from edit_jax.train.loop import train
from edit_jax.train.step import init_schedule, make_loss_fn, rollout_value_and_grad

MAX_REUSE = 2


def reference_rule(p: np.ndarray, tau: float = 0.5):
    """p [S, B, L] -> (computed, reused) [S, B, L]: a closed block reuses while it has a residual
    stored and fewer than MAX_REUSE reuses since; every other block computes."""
    steps, batch, layers = p.shape
    stored, count = np.zeros((batch, layers), bool), np.zeros((batch, layers), int)
    computed = np.zeros(p.shape, bool)
    for s in range(steps):
        for b in range(batch):
            for block in range(layers):
                if p[s, b, block] < tau and stored[b, block] and count[b, block] < MAX_REUSE:
                    count[b, block] += 1
                else:
                    computed[s, b, block], stored[b, block], count[b, block] = True, True, 0
    return computed, ~computed


@pytest.fixture(scope="module")
def reuse_run():
    case = Case("flux")
    p = scripted_probabilities(6, 2, case.num_blocks, seed=3)
    method = LearnedReuse(max_reuse=MAX_REUSE)
    records, caches = run_steps(case, p, ElasticConfig(mode="forced", block_cache=method),
                                init_cache(case.config, 2, 12, 5, method))
    return case, p, records, caches


def test_closed_blocks_reuse_until_max_reuse_and_every_other_block_computes(reuse_run):
    _, p, records, _ = reuse_run
    computed, reused = reference_rule(p)
    np.testing.assert_array_equal(np.stack([r["executed"] for r in records]), computed)
    np.testing.assert_array_equal(np.stack([r["cache_hit"] for r in records]), reused)
    assert reused.any() and (computed & (p < 0.5)).any()  # the script exercises reuse and the forced refresh


def velocity(case, method, cache, run, step):
    elastic = ElasticConfig(mode="forced", block_cache=method)
    decisions = {"run": jnp.asarray(run, bool), "bucket": jnp.full((case.num_blocks,), 3, jnp.int32)}
    return case.model.apply({"params": case.params}, **case.arrays, **case.static, elastic=elastic,
                            decisions=decisions, cache=cache, step=step)


@pytest.mark.parametrize("order", [0, 1])
def test_closed_blocks_at_unchanged_inputs_give_the_computed_velocity(order):
    case = Case("qwen-image")
    method = LearnedReuse(max_reuse=3, order=order)
    cache = init_cache(case.config, 2, 12, 5, method)
    on, off = np.ones(case.num_blocks, bool), np.zeros(case.num_blocks, bool)
    call = jax.jit(lambda cache, run, step: velocity(case, method, cache, run, step))  # one program for the three calls
    computed, aux = call(cache, on, 0)
    _, aux = call(aux["cache"], on, 1)  # the same inputs again: the residuals' change is 0
    reused, aux = call(aux["cache"], off, 2)
    skipped = case.elastic(ElasticConfig(mode="forced"), {"run": jnp.asarray(off), "bucket": jnp.full((case.num_blocks,), 3)})[0]

    assert aux["cache_hit"].all() and not aux["executed"].any()
    np.testing.assert_allclose(reused, computed, rtol=1e-5, atol=1e-6)  # each block adds exactly what it computed
    assert not np.allclose(skipped, computed, atol=1e-3)  # where skipping (the identity) does not


def test_first_order_reuse_extrapolates_the_residuals_change_per_step():
    method = LearnedReuse(max_reuse=3, order=1)
    state = method.init(1, ((1, 2, 3),), 1)
    state = jax.tree.map(lambda x: x[0], state)
    carry = (jnp.zeros((1, 2, 3)),)
    computed, none = jnp.ones((1,), bool), jnp.zeros((1,), bool)
    state = method.update(state, 0, carry, (jnp.full((1, 2, 3), 1.0),), computed, none)
    state = method.update(state, 1, carry, (jnp.full((1, 2, 3), 3.0),), computed, none)  # +2 per step

    np.testing.assert_allclose(method.reuse(state, carry)[0], 5.0)
    state = method.update(state, 2, carry, method.reuse(state, carry), none, ~none)
    np.testing.assert_allclose(method.reuse(state, carry)[0], 7.0)


def rollout_setup(**overrides):
    fields = dict(preset="flux-tiny", objective="rollout", closed="reuse", rollout_steps=3, rollout_schedule=6,
                  target="data", batch_size=2, num_txt=4, reuse_max=2)
    config = TrainConfig(**{**fields, **overrides})
    model_config = edit_jax.preset("flux-tiny")
    variables = init_variables(model_config)
    batch = {**synthetic_batch(model_config, config, 0), **shared_inputs(model_config, 4, 4, 4)}
    batch.pop("label")
    loss_fn = make_loss_fn(config, edit_jax.build_model(model_config))
    return loss_fn, variables, batch, config


def test_the_rollout_loss_and_its_gradient_are_finite_and_the_reuse_path_is_trained():
    loss_fn, variables, batch, config = rollout_setup(tau=0.75)  # fresh routers' p = 0.7: closed, so they reuse
    args = ({"routers": variables["routers"]}, {"params": variables["params"]}, batch, jax.random.key(0))
    (loss, metrics), grads = rollout_value_and_grad(config, edit_jax.build_model(edit_jax.preset("flux-tiny")))(*args)

    assert np.isfinite(float(loss)) and float(metrics["reuse_rate"]) > 0
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves) and sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    # step by step inside the window, the same gradient as differentiating the rollout with its stopped gradients
    (same_loss, _), by_autodiff = jax.value_and_grad(loss_fn, has_aux=True)(*args)
    assert float(same_loss) == pytest.approx(float(loss), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, by_autodiff)


def test_routers_all_open_on_the_rollout_match_the_dense_model_exactly():
    loss_fn, variables, batch, _ = rollout_setup()  # p = 0.7 >= tau 0.5: every block computes at full width
    _, metrics = loss_fn({"routers": variables["routers"]}, {"params": variables["params"]}, batch, jax.random.key(1))
    assert float(metrics["flow_loss"]) < 1e-12 and float(metrics["reuse_rate"]) == 0.0


def test_a_resumed_rollout_run_equals_an_uninterrupted_one(tmp_path):
    fields = dict(preset="flux-tiny", steps=4, batch_size=2, log_every=1, save_every=2, learning_rate=1e-2,
                  warmup_steps=1, num_txt=4, objective="rollout", closed="reuse", rollout_steps=2, rollout_schedule=4)
    train(TrainConfig(**fields, run_dir=str(tmp_path / "whole")), progress=False)
    train(TrainConfig(**fields, run_dir=str(tmp_path / "parts")), progress=False, max_steps=2)
    train(TrainConfig(**fields, run_dir=str(tmp_path / "parts")), progress=False)

    whole, parts = (edit_jax.load_routers(tmp_path / n / "edit-jax") for n in ("whole", "parts"))
    jax.tree.map(np.testing.assert_array_equal, whole, parts)


@pytest.mark.parametrize("overrides, message", [
    (dict(closed="reuse"), "train it with objective='rollout'"),
    (dict(objective="rollout", trainable="routers+base"), "needs a frozen base"),
    (dict(objective="rollout", rollout_steps=30), "rollout_steps=30 must be in"),
    (dict(rollout_loss="final"), "judges a rollout's window: it needs objective='rollout'"),
    (dict(objective="rollout", schedule_init_interval=3), "schedule_init_interval=3 starts a learned step schedule"),
])
def test_settings_that_cannot_train_reuse_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)


def test_a_trained_reuse_checkpoint_says_so_and_sample_runs_its_routers_with_their_reuse(tmp_path, capsys):
    fields = dict(preset="flux-tiny", steps=2, batch_size=2, log_every=1, save_every=2, warmup_steps=1, num_txt=4,
                  objective="rollout", closed="reuse", rollout_steps=2, rollout_schedule=4, reuse_max=3, tau=0.75)
    train(TrainConfig(**fields, run_dir=str(tmp_path / "run")), progress=False)
    ckpt = tmp_path / "run" / "edit-jax"
    assert router_mode(ckpt) == {"closed": "reuse", "max_reuse": 3, "order": 0}

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "emb.npz", prompt_embeds=rng.standard_normal((1, 4, 32)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((1, 32)).astype(np.float32))
    args = ["sample", str(ckpt), "--embeddings", str(tmp_path / "emb.npz"), "--height", "32", "--width", "32",
            "--steps", "4", "--elastic", "infer", "--tau", "0.75"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["block_cache"] == "learned_reuse" and summary["cache_hit_rate"] > 0
    assert main([*args, "--out", str(tmp_path / "cached"), "--cache"]) == 2
    assert "trained to reuse" in capsys.readouterr().err


@pytest.mark.parametrize("interval", [2, 3])
def test_a_schedule_started_from_taylor_seers_map_opens_every_block_at_the_steps_taylor_seer_computes(interval):
    config = TrainConfig(trainable="schedule", objective="rollout", closed="reuse", rollout_schedule=12,
                         schedule_init_interval=interval)
    p = np.asarray(jax.nn.sigmoid(init_schedule(config, edit_jax.preset("flux-tiny"))))
    computes = [bool(TaylorSeer(cache_interval=interval, disable_cache_before_step=1).computes_at(step)) for step in range(12)]

    np.testing.assert_array_equal(p >= config.tau, np.repeat(np.asarray(computes)[:, None], p.shape[1], axis=1))
    assert computes[:3] == [True, False, True] and 1 < sum(computes) < 12


def test_a_learned_schedule_is_trained_only_on_the_rows_of_its_rollout_window():
    _, variables, batch, config = rollout_setup(trainable="schedule", tau=0.75)  # p = 0.7: closed, so they reuse
    model = edit_jax.build_model(edit_jax.preset("flux-tiny"))
    schedule = init_schedule(config, model.config)
    (loss, metrics), grads = rollout_value_and_grad(config, model)(
        {"schedule": schedule}, {"params": variables["params"]}, batch, jax.random.key(0))

    assert schedule.shape == (config.rollout_schedule, model.config.num_blocks)
    assert np.isfinite(float(loss)) and float(metrics["reuse_rate"]) > 0
    assert float(loss) == pytest.approx(float(metrics["flow_loss"] + metrics["gate_loss"]))  # no width term: no widths
    trained_rows = np.flatnonzero(np.abs(np.asarray(grads["schedule"])).sum(axis=1) > 0)
    assert len(trained_rows) == config.rollout_steps and np.all(np.diff(trained_rows) == 1)  # one window of steps


def final_rollout_reference(config, model, params, schedule, batch, key):
    """rollout_loss="final" written out step by step for a schedule over a whole-schedule window (start
    0): the routed and the dense model step from the same noisy start, the loss is the error of the
    window's mean velocity plus each step's gate term, lambda_g (mean(hard gate) - rho_g)^2."""
    x0 = batch["latents"]
    cond = {k: v for k, v in batch.items() if k != "latents"}
    times = jnp.asarray(flow_match_schedule(default_scheduler(model.config), config.rollout_schedule, x0.shape[1])[0])
    noise = jax.random.normal(jax.random.split(key)[0], x0.shape)
    x = x_dense = (1 - times[0]) * x0 + times[0] * noise
    method = LearnedReuse(config.reuse_max, config.reuse_order)
    cache = init_cache(model.config, x0.shape[0], x0.shape[1], cond["encoder_hidden_states"].shape[1], method)
    elastic = ElasticConfig(mode="train", tau=config.tau, block_cache=method)
    full = jnp.full((model.config.num_blocks,), len(model.config.width_buckets) - 1, jnp.int32)
    gate_terms = []
    for i in range(config.rollout_steps):
        timestep = jnp.full((x0.shape[0],), times[i])
        p = jax.nn.sigmoid(schedule[i])
        v, aux = model.apply({"params": params}, hidden_states=x, timestep=timestep, **cond, elastic=elastic,
                             decisions={"p": p, "bucket": full}, cache=cache, step=i)
        v_dense = model.apply({"params": params}, hidden_states=x_dense, timestep=timestep, **cond)
        dt = times[i + 1] - times[i]
        x, x_dense, cache = x + dt * v, x_dense + dt * v_dense, aux["cache"]
        gate = (p >= config.tau) + p - jax.lax.stop_gradient(p)
        gate_terms.append(config.lambda_g * jnp.square(jnp.mean(gate) - config.rho_g))
    span = times[config.rollout_steps] - times[0]
    return jnp.mean(jnp.square((x - x_dense) / span)) + jnp.mean(jnp.stack(gate_terms))


def test_the_final_rollout_loss_and_its_gradient_through_every_step_equal_a_step_by_step_reference():
    _, variables, batch, config = rollout_setup(trainable="schedule", rollout_loss="final", rollout_steps=3,
                                                rollout_schedule=3, tau=0.75)
    model = edit_jax.build_model(edit_jax.preset("flux-tiny"))
    schedule, key = init_schedule(config, model.config), jax.random.key(0)
    (loss, metrics), grads = jax.jit(rollout_value_and_grad(config, model))(
        {"schedule": schedule}, {"params": variables["params"]}, batch, key)

    expected, expected_grads = jax.jit(jax.value_and_grad(
        lambda table: final_rollout_reference(config, model, variables["params"], table, batch, key)))(schedule)
    assert float(metrics["reuse_rate"]) > 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_allclose(grads["schedule"], expected_grads, rtol=1e-4, atol=1e-8)
    assert (np.abs(np.asarray(grads["schedule"])).sum(axis=1) > 0).all()  # every step of the window is trained


def test_a_schedule_run_keeps_its_learned_p_in_the_checkpoint_and_samples_with_it_as_one_map_for_every_sample(tmp_path):
    fields = dict(preset="flux-tiny", steps=3, batch_size=2, log_every=1, save_every=3, warmup_steps=1, num_txt=4,
                  trainable="schedule", objective="rollout", closed="reuse", rollout_steps=2, rollout_schedule=4,
                  reuse_max=3, learning_rate=0.5, rho_g=0.0)
    train(TrainConfig(**fields, run_dir=str(tmp_path / "run")), progress=False)
    ckpt = tmp_path / "run" / "edit-jax"
    learned = step_schedule(ckpt)
    p = np.asarray(learned["p"])
    config = edit_jax.preset("flux-tiny")
    assert p.shape == (4, config.num_blocks) and (p < 0.7).any()  # the budget pushed some steps' blocks closed
    assert {k: learned[k] for k in ("tau", "closed", "max_reuse", "order")} == dict(tau=0.5, closed="reuse", max_reuse=3,
                                                                                  order=0)
    assert load_routers(ckpt) is None  # a schedule, not routers

    elastic, decisions = learned_schedule(learned, 4, len(config.width_buckets))
    variables = init_variables(config)
    inputs = edit_jax.models.registry.example_inputs(config, batch=2, num_txt=4)
    cond = {k: inputs[k] for k in ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")}
    _, records = sample(edit_jax.build_model(config), variables["params"], jnp.asarray(inputs["hidden_states"]), cond,
                        SamplerConfig(num_steps=4), elastic=elastic, decisions=decisions)
    computed = np.asarray(records["executed"])  # [S, B, L]
    assert (computed[:, 0] == computed[:, 1]).all()  # one map for every sample
    closed = p < 0.5
    assert (computed[0]).all() and (np.asarray(records["cache_hit"])[1:] <= closed[1:, None]).all()
    with pytest.raises(ValueError, match="learned for 4 sampling steps, not 6"):
        learned_schedule(learned, 6, len(config.width_buckets))


def test_a_schedule_learns_only_on_the_rollout():
    with pytest.raises(ConfigError, match="trainable='schedule' learns a p for each step"):
        TrainConfig(trainable="schedule")


def test_sample_runs_a_checkpoints_learned_schedule_and_names_what_is_missing(tmp_path, capsys):
    config = edit_jax.preset("flux-tiny")
    p = np.full((3, config.num_blocks), 0.9)
    p[1:, 0] = 0.1  # block 0 computes at the first step, then reuses
    schedule = {"p": p.tolist(), "tau": 0.5, "closed": "reuse", "max_reuse": 4, "order": 0}
    save(tmp_path / "scheduled", config, init_variables(config)["params"], step_schedule=schedule)
    save(tmp_path / "plain", config, init_variables(config)["params"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "emb.npz", prompt_embeds=rng.standard_normal((2, 4, 32)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((2, 32)).astype(np.float32))
    args = ["--embeddings", str(tmp_path / "emb.npz"), "--height", "32", "--width", "32", "--elastic", "schedule"]

    assert main(["sample", str(tmp_path / "scheduled"), *args, "--steps", "3", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["elastic"] == "schedule" and summary["block_cache"] == "learned_reuse"
    records = np.load(tmp_path / "out" / "records.npz")
    assert records["cache_hit"][1:, :, 0].all() and records["executed"][:, :, 1:].all() and records["executed"][0].all()
    assert main(["sample", str(tmp_path / "scheduled"), *args, "--steps", "4", "--out", str(tmp_path / "o2")]) == 2
    assert "learned for 3 sampling steps, not 4" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "plain"), *args, "--steps", "3", "--out", str(tmp_path / "o3")]) == 2
    assert "holds no learned step schedule" in capsys.readouterr().err
