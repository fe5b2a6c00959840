"""kiln's own error classes: each is also the builtin it refines, and kiln exports them."""

from __future__ import annotations

import shutil

import pytest

import kiln
from kiln.errors import KilnError, ModelFileError, OutOfMemory, RequestError


@pytest.mark.parametrize(("error", "builtin"), [(KilnError, Exception), (RequestError, ValueError),
                                                (ModelFileError, ValueError),
                                                (OutOfMemory, MemoryError)])
def test_each_error_is_a_kiln_error_and_its_documented_builtin(error, builtin):
    assert issubclass(error, KilnError) and issubclass(error, builtin)
    assert error.__doc__


def test_kiln_exports_the_errors():
    from kiln import errors

    for name in ("KilnError", "RequestError", "ModelFileError", "OutOfMemory"):
        assert getattr(kiln, name) is getattr(errors, name)


def test_a_truncated_weight_file_is_a_model_file_error(neox_pair, tmp_path):
    folder = shutil.copytree(neox_pair[1], tmp_path / "copy")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        kiln.Generator(folder)
