"""fusednoise.integrations.transformers: the former home of the layer finders re-exports them, and re-exports
the Trainer integration lazily."""
import subprocess
import sys

import pytest

import fusednoise.layers as layers


def test_the_finders_keep_their_old_import_path():
    import fusednoise.integrations.transformers as integration

    for name in layers.__all__:
        assert getattr(integration, name) is getattr(layers, name) and name in integration.__all__


def test_the_trainer_integration_is_importable_from_the_transformers_module():
    import fusednoise.integrations.transformers as integration
    from fusednoise.integrations import trainer

    for name in trainer.__all__:
        assert getattr(integration, name) is getattr(trainer, name)
        assert name in integration.__all__ and name in dir(integration)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        integration.not_a_name


def test_the_methods_import_the_finders_without_the_trainer_integration():
    # The layering of DESIGN.md: hype and lnsr sit above fusednoise.layers and below integrations/, so importing
    # them (or the finders' old path) loads neither the Trainer integration nor transformers.
    code = ("import sys, fusednoise, fusednoise.hype, fusednoise.lnsr, fusednoise.integrations.transformers; "
            "print(sorted(m for m in sys.modules if m.startswith('transformers') "
            "or m == 'fusednoise.integrations.trainer'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
