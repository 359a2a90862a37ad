"""The public block exports of dtf_jax.layers resolve to the defining modules' classes."""

import importlib

import pytest

import dtf_jax.layers as layers


@pytest.mark.parametrize("name", layers.__all__)
def test_export_is_the_defining_class(name):
  module = importlib.import_module(layers._EXPORTS[name])  # pylint: disable=protected-access
  assert getattr(layers, name) is getattr(module, name)


def test_unknown_name_raises_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'NotABlock'"):
    getattr(layers, "NotABlock")
