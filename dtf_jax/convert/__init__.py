"""PyTorch checkpoint conversion for the DTF/SIFA networks (SPEC.md sections 1.2 and 5).

* ``from_pytorch(name, checkpoint, *, source='original'|'imagenet', num_classes, ...)``: the network
  with a PyTorch checkpoint's weights (the originals' video checkpoints, or torchvision / official
  Swin ImageNet weights inflated like the originals' ``transfer_weights``).
* ``to_pytorch(model, name)`` / ``export_pytorch(model, name, path)``: back to the originals' key
  names and layouts (``.safetensors`` or ``.pth``); the round trip is the identity.
* ``save_model`` / ``load_model``: the converter's output directory (orbax model state + JSON).
* Command line: ``python -m dtf_jax.convert --help``.

torch is optional (``pip install 'dtf_jax[torch]'``) and imported only inside this package, when a
``.pth`` file is read or written; checkpoints are read with ``torch.load(weights_only=True)`` or
safetensors, never with a full unpickle.
"""

from dtf_jax.convert.api import (SOURCES, SWIN_GPU_LAYOUT_WARNING, convert_state_dict, export_pytorch,
                                 from_pytorch, load_into, prepare_state_dict, to_pytorch,
                                 torch_shapes)
from dtf_jax.convert.export import load_model, model_meta, read_meta, save_model
from dtf_jax.convert.imagenet import inflate_resnet, inflate_stem_kernel, inflate_swin
from dtf_jax.convert.loading import (UnsafeCheckpointError, read_state_dict, require_torch,
                                     write_state_dict)
from dtf_jax.convert.mapping import ConversionError, ConversionReport, checkpointed_state
from dtf_jax.convert.rules import convert_fft_weight, remove_defcor_weight, remove_fc

__all__ = [
    "SOURCES", "SWIN_GPU_LAYOUT_WARNING", "ConversionError", "ConversionReport",
    "UnsafeCheckpointError", "checkpointed_state", "convert_fft_weight", "convert_state_dict",
    "export_pytorch", "from_pytorch", "inflate_resnet", "inflate_stem_kernel", "inflate_swin",
    "load_into", "load_model", "model_meta", "prepare_state_dict", "read_meta", "read_state_dict",
    "remove_defcor_weight", "remove_fc", "require_torch", "save_model", "to_pytorch", "torch_shapes",
    "write_state_dict",
]
