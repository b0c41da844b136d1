"""Fixtures shared by the kernel tests."""
import pytest


@pytest.fixture
def mosaic_modules(monkeypatch):
    """Captures the Mosaic module text of each TPU pallas_call (serialized opaquely in the custom call)."""
    try:
        from jax._src.pallas.mosaic import pallas_call_registration as reg
    except ImportError as e:
        pytest.skip(f"Pallas Mosaic lowering unavailable: {e}")
    seen = []
    orig = reg.lowering.lower_jaxpr_to_pipelined_module

    def capture(*a, **kw):
        module = orig(*a, **kw)
        seen.append(str(module))
        return module

    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_pipelined_module", capture)
    return seen
