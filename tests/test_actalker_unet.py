"""ACTalker UNet (SVD UNet + PCM + IP-adapters): full-size counts, IP semantics, residual mode, sharding, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from actalker_jax import sharding
from actalker_jax.models.actalker_unet import ACTalkerUNet, PCMConfig
from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel, count_params

SVD_XT_PARAMS = 1_524_623_082
TINY = UNetConfig.tiny(temporal_context="frame_mean")


def count_under(module, word):
    return sum(int(np.prod(v.get_value().shape)) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
               if word in path)


def test_svd_xt_actalker_counts_without_allocation():
    unet = nnx.eval_shape(lambda: ACTalkerUNet(UNetConfig.svd_xt(temporal_context="frame_mean"), rngs=nnx.Rngs(0)))
    assert count_under(unet, "mamba_blocks") == 148_601_600
    assert count_under(unet, "processor") == 102_236_160
    assert count_params(unet) == SVD_XT_PARAMS + 148_601_600 + 102_236_160
    assert len(unet.ip_processors()) == 32
    pcm_layers = [t.mamba_blocks is not None for b in list(unet.down_blocks) + list(unet.up_blocks)
                  for t in (b.attentions or ())]
    assert pcm_layers == [True] * 15 and unet.mid_block.attentions[0].mamba_blocks is None


def make_inputs(batch=2, frames=3, latent=(4, 6), seed=0, dc=32, na=4):
    rng = np.random.default_rng(seed)
    h, w = latent
    masks = np.zeros((2, batch, 8 * h, 8 * w), np.float32)
    masks[0, :, 16:, 8:40] = 1       # "mouth"
    masks[1, :, :16, :] = 1          # "face minus mouth"
    masks[1, -1] = 1                 # the last sample scans everything in the motion branch
    return dict(
        sample=jnp.asarray(rng.standard_normal((batch, frames, h, w, 8)), jnp.float32),
        timestep=jnp.asarray(rng.uniform(-1, 1, (batch,)), jnp.float32),
        id_tokens=jnp.asarray(rng.standard_normal((batch, 1, dc)), jnp.float32),
        audio_tokens=jnp.asarray(rng.standard_normal((batch, frames, na, dc)), jnp.float32),
        motion_tokens=jnp.asarray(rng.standard_normal((batch, frames, 1, dc)), jnp.float32),
        added_time_ids=jnp.asarray([[12.5, 12, 20]] * batch, jnp.float32),
        mask_audio=jnp.asarray(masks[0]), mask_motion=jnp.asarray(masks[1]),
    )


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    return jax.jit(lambda state, kwargs: nnx.merge(graphdef, state)(**kwargs))


def run(module, kwargs):
    graphdef, state = nnx.split(module)
    return _forward(graphdef)(state, kwargs)


@pytest.fixture(scope="module")
def tiny_unet():
    return ACTalkerUNet(TINY, PCMConfig(scan_impl="xla"), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def test_ip_adapters_start_as_copies_of_their_layer(tiny_unet):
    attn = tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    for j in range(2):
        np.testing.assert_array_equal(attn.processor.to_k_ip[j].kernel.get_value(), attn.to_k.kernel.get_value())
        np.testing.assert_array_equal(attn.processor.to_v_ip[j].kernel.get_value(), attn.to_v.kernel.get_value())


def test_zero_condition_tokens_add_nothing_through_ip(tiny_unet):
    """IP K/V have no bias: all-zero (gated-off) tokens give exactly zero IP output in every attn2."""
    x = make_inputs()
    zero = dict(x, audio_tokens=jnp.zeros_like(x["audio_tokens"]), motion_tokens=jnp.zeros_like(x["motion_tokens"]))
    for attn in tiny_unet._attn2_layers():
        q = jnp.ones((2, 5, attn.heads, attn.dim_head))
        conditions = dict(audio_tokens=zero["audio_tokens"], motion_tokens=zero["motion_tokens"],
                          mask_audio=x["mask_audio"], mask_motion=x["mask_motion"])
        if attn.processor.temporal:
            out = attn.processor(attn, q, conditions)
        else:
            q = jnp.ones((6, 24, attn.heads, attn.dim_head))
            out = attn.processor(attn, q, conditions, (4, 6))
        np.testing.assert_array_equal(np.asarray(out), 0.0)


def _regions():
    """(mouth, face minus mouth) (1, 32, 32) masks of a 32x32 frame, laid out like the demo's records."""
    mouth = np.zeros((1, 32, 32), np.float32)
    mouth[:, 19:27, 10:22] = 1
    face = np.zeros_like(mouth)
    face[:, 3:29, 3:25] = 1
    return mouth, face * (1 - mouth)


def _spatial_ip(masks, grid, motion_mask):
    """One spatial IP processor's output (F, h*w, heads, dim) for random motion tokens (zero audio tokens)."""
    from actalker_jax.models.ip_adapter import IPAdapterProcessor
    from actalker_jax.models.layers import Attention
    rng = np.random.default_rng(1)
    dc, channels, frames = 32, 16, 2
    attn = Attention(channels, heads=2, dim_head=8, cross_attention_dim=dc, rngs=nnx.Rngs(0))
    processor = IPAdapterProcessor(channels, dc, temporal=False, masks=masks, rngs=nnx.Rngs(1))
    mouth, _ = _regions()
    conditions = dict(audio_tokens=jnp.zeros((1, frames, 4, dc)),
                      motion_tokens=jnp.asarray(rng.standard_normal((1, frames, 1, dc)), jnp.float32),
                      mask_audio=jnp.asarray(mouth), mask_motion=jnp.asarray(motion_mask))
    q = jnp.asarray(rng.standard_normal((frames, grid[0] * grid[1], 2, 8)), jnp.float32)
    return np.asarray(processor(attn, q, conditions, grid))


@pytest.mark.parametrize("grid", [(16, 16), (8, 8)])
def test_token_ip_masks_keep_the_motion_out_of_the_mouth(grid):
    """ip_masks "tokens": the motion adapter adds exactly its unmasked output on the tokens the motion branch scans and
    nothing elsewhere (the mouth included); the released soft bicubic masks also reach mouth tokens (-0.09 of the
    motion output on the mouth's edge tokens at both grids)."""
    from actalker_jax.models.masks import select_tokens
    mouth, motion = _regions()
    unmasked = _spatial_ip("bicubic", grid, np.ones_like(motion))
    hard = _spatial_ip("tokens", grid, motion)
    soft = _spatial_ip("bicubic", grid, motion)
    motion_tokens = np.asarray(select_tokens(jnp.asarray(motion), grid))[0]
    mouth_tokens = np.asarray(select_tokens(jnp.asarray(mouth), grid))[0]
    assert motion_tokens.any() and mouth_tokens.any() and not (motion_tokens & mouth_tokens).any()
    np.testing.assert_array_equal(hard[:, ~motion_tokens], 0.0)
    np.testing.assert_allclose(hard[:, motion_tokens], unmasked[:, motion_tokens], rtol=1e-6, atol=1e-7)
    assert np.abs(unmasked).min() > 0
    leak = np.abs(soft[:, mouth_tokens]).max() / np.abs(unmasked[:, mouth_tokens]).max()
    assert leak > 0.05


def test_ip_masks_option_is_checked():
    with pytest.raises(ValueError, match="ip_masks"):
        PCMConfig(ip_masks="nearest")


def test_batch_of_two_equals_two_batch_one_runs(tiny_unet):
    x = make_inputs()
    both = run(tiny_unet, x)
    for b in range(2):
        single = run(tiny_unet, {k: v[b:b + 1] for k, v in x.items()})
        np.testing.assert_allclose(np.asarray(both[b:b + 1]), np.asarray(single), rtol=1e-4, atol=1e-5)


def test_zero_init_residual_leaves_the_unet_unchanged():
    """PCM (zero out_proj, residual) and IP (zero V) add nothing at init: the SVD UNet's output, exactly."""
    model = ACTalkerUNet(TINY, PCMConfig(scan_impl="xla", residual="zero_init_residual"),
                         rngs=nnx.Rngs(jax.random.key(1, impl="rbg")))
    base = nnx.eval_shape(lambda: UNetSpatioTemporalConditionModel(TINY, rngs=nnx.Rngs(0)))
    graphdef, base_state = nnx.split(base)
    model_params = {path: v for path, v in nnx.to_flat_state(nnx.state(model))}
    base_state = nnx.from_flat_state([(p, v.replace(model_params[p].get_value()))
                                      for p, v in nnx.to_flat_state(base_state)])
    base = nnx.merge(graphdef, base_state)
    x = make_inputs()
    want = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(
        base_state, x["sample"], x["timestep"], x["id_tokens"], x["added_time_ids"])
    np.testing.assert_allclose(np.asarray(run(model, x)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_bf16_forward_close_to_fp32(tiny_unet):
    """The same parameters rounded to bf16, bf16 compute: within 2e-2 relative L2 of the fp32 forward."""
    x = make_inputs()
    want = run(tiny_unet, x)
    bf16 = jnp.bfloat16
    graphdef, _ = nnx.split(nnx.eval_shape(
        lambda: ACTalkerUNet(TINY, PCMConfig(scan_impl="xla"), rngs=nnx.Rngs(0), dtype=bf16, param_dtype=bf16)))
    state = jax.tree.map(lambda a: a.astype(bf16), nnx.state(tiny_unet))
    inputs = {k: v if k in ("timestep", "mask_audio", "mask_motion") else v.astype(bf16) for k, v in x.items()}
    got = jax.jit(lambda s, kw: nnx.merge(graphdef, s)(**kw))(state, inputs)
    assert got.dtype == bf16
    err = np.linalg.norm(np.asarray(got, np.float32) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
    assert err <= 2e-2


def test_sharded_forward_matches_single_device(tiny_unet):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
    x = make_inputs(batch=2)
    want = run(tiny_unet, x)
    graphdef, state = nnx.split(tiny_unet)
    specs = sharding.param_specs(state, mesh=mesh)
    state = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    with sharding.axis_rules(mesh):
        got = jax.jit(lambda s, kw: nnx.merge(graphdef, s)(**kw))(state, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_bad_inputs_are_named(tiny_unet):
    x = make_inputs()
    with pytest.raises(ValueError, match="mask_audio must be"):
        tiny_unet(**dict(x, mask_audio=x["mask_audio"][:, :8]))
    with pytest.raises(ValueError, match="audio_tokens must be"):
        tiny_unet(**dict(x, audio_tokens=x["audio_tokens"][:, 0]))
