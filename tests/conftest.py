"""Shared fixtures. Tests run offline on CPU; the embedded model is built once per machine."""
import pytest

import npt


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded smollm2-135m, unconverted: copy before converting."""
    return npt.load_base_model(npt.EMBEDDED_MODEL)
