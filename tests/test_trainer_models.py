"""The adapters reproduce the diffusers pipelines: deterministic sampling through an adapter (its sigmas, timestep
convention, CFG / guidance embedding, latent packing) ends where ``pipe(...)`` itself ends from the same noise."""
import pytest
import torch

from _trainer import one_thread, tiny  # noqa: F401 (fixture)

from grpo_guard.models import build_adapter
from grpo_guard.trainer.rollout import _noise, generate, mix_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family,guidance", [("sd3", 4.5), ("flux", 3.5)])
def test_adapter_matches_pipeline(family, guidance, tmp_path):
    cfg = tiny(family, tmp_path, f"sample.guidance_scale={guidance}")
    adapter = build_adapter(cfg.model, seed=0)
    prompts = ["a red cat", "digit 7"]
    ours = generate(adapter, adapter.transformer, prompts, cfg, seeds=[0, 1])
    # the same initial noise, through the pipeline's own loop
    gens = [torch.Generator().manual_seed(mix_seed(cfg.run.seed, k, 6)) for k in (0, 1)]
    x0 = _noise(gens, adapter.latent_shape(), adapter.device, torch.float32)
    with torch.no_grad():
        theirs = adapter.pipe(prompts, height=cfg.model.resolution, width=cfg.model.resolution,
                              num_inference_steps=cfg.sample.num_steps, guidance_scale=guidance, latents=x0.clone(),
                              output_type="latent", max_sequence_length=cfg.model.max_sequence_length).images
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, x0)


def test_flux_sigmas_use_the_dynamic_shift(tmp_path):
    """Flux: the sigmas are the pipeline's, shifted by mu (from the image sequence length), unlike SD3's shift 3."""
    import numpy as np

    adapter = build_adapter(tiny("flux", tmp_path).model)
    mu = adapter.mu()
    s = np.linspace(1.0, 0.25, 4)
    want = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    assert adapter.sigmas(4)[:-1] == pytest.approx(want.tolist(), rel=1e-6) and adapter.sigmas(4)[-1] == 0.0
