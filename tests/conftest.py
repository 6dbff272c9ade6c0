import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# the toy models (tests/toy_models, one file + one YAML each) are registered for the session
os.environ.setdefault("ITM_PIPELINE_MODELS",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_models"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread is as fast, deterministic, and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny embedded dataset (SCAN precomp layout), generated once per test session."""
    from pipeline.data.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("data") / "synthetic"
    generate(out, SyntheticConfig(n_train=100, n_dev=25, n_test=25, feature_dim=16, seed=0),
             progress=False)
    return out


@pytest.fixture(scope="session")
def ckpt(tiny_data, tmp_path_factory):
    """A tiny VSE++ checkpoint trained one epoch on tiny_data (for embedding/mining tests)."""
    from stages import train_base

    out = tmp_path_factory.mktemp("tiny_base")
    res = train_base.run(model="vsepp", data_dir=tiny_data, out_dir=out,
                         model_options={"embed_size": 16, "word_dim": 8},
                         train_options={"epochs": 1, "batch_size": 16}, progress=False)
    return res["checkpoint"]


@pytest.fixture(scope="session")
def tiny_trained(tiny_data, tmp_path_factory):
    """`tiny_trained(model, **options)`: a checkpoint of that registered model at its
    config's `tiny` widths (plus options), one epoch (batch 16) on tiny_data; trained once
    per session and options. Tests must not write into it."""
    from pipeline.models import model_config
    from stages import train_base

    done = {}

    def get(model: str, **options):
        key = (model, tuple(sorted(options.items())))
        if key not in done:
            out = tmp_path_factory.mktemp(f"tiny_{model}")
            done[key] = train_base.run(model=model, data_dir=tiny_data, out_dir=out,
                                       model_options={**model_config(model)["tiny"], **options},
                                       train_options={"epochs": 1, "batch_size": 16},
                                       progress=False)["checkpoint"]
        return done[key]

    return get
