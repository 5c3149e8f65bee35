"""Sampling prompts a batch at a time (`edit_jax.sampling.batches`), the loop sample, generate and eval share."""

import jax.numpy as jnp
import numpy as np

from edit_jax.sampling.batches import rows_conditions, rows_of, sample_in_batches
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.sampling.sampler import SamplerConfig, concat_records, make_conditions, sample
from elastic_cases import Case

SAMPLER = SamplerConfig(num_steps=2)


def prompts(case, count):
    rng = np.random.default_rng(0)
    cond = make_conditions(case.config, rng.standard_normal((count, 4, case.config.joint_attention_dim)), 32, 32)
    noise = jnp.asarray(rng.standard_normal((count, 4, case.config.in_channels)), jnp.float32)
    return noise, cond


def test_batches_give_the_latents_and_records_of_one_whole_run():
    case = Case("qwen-image")
    noise, cond = prompts(case, 3)
    elastic = ElasticConfig(mode="infer", decision="sample")
    whole, records = sample(case.model, case.params, noise, cond, SAMPLER, routers=case.routers, elastic=elastic)
    batches = list(sample_in_batches(case.model, case.params, noise, rows_conditions(cond), SAMPLER, 2,
                                     routers=case.routers, elastic=elastic))
    assert [b.ids for b in batches] == [[0, 1], [2]]
    np.testing.assert_allclose(np.concatenate([b.latents[: len(b.ids)] for b in batches]), whole, rtol=1e-5, atol=1e-6)
    joined = concat_records([(b.records, len(b.ids)) for b in batches])
    np.testing.assert_array_equal(joined["executed"], np.asarray(records["executed"]))


def test_the_last_batch_is_padded_to_the_batch_size_and_its_padding_left_out():
    case = Case("qwen-image")
    noise, cond = prompts(case, 3)
    seen = []

    def conditions(ids):
        seen.append(list(ids))
        return rows_of(cond, ids), None

    batches = list(sample_in_batches(case.model, case.params, noise, conditions, SAMPLER, 2, pad_last=True))
    assert seen == [[0, 1], [2, 2]] and [b.ids for b in batches] == [[0, 1], [2]]
    assert batches[1].latents.shape[0] == 2 and batches[1].records == {}
    np.testing.assert_array_equal(batches[1].latents[0], batches[1].latents[1])
