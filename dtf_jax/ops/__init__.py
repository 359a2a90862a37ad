"""Public ops of dtf_jax (SPEC.md section 2), channels-last, with implementation dispatch.

* ``temporal_correlation``, ``temporal_aggregation``: DTF ops with integer taps (2.1, 2.2);
* ``deformable_correlation``, ``deformable_aggregation``: SIFA ops with bilinear taps (2.3-2.5);
* ``frame_wise_aggregation``: the fused DTF steps 1-4 (3.2);
* ``temporal_correlation_aggregation``: SIFA-Swin's correlation + aggregation (3.8).

``impl='auto' | 'xla' | 'pallas'`` selects the implementation (``dtf_jax.ops.dispatch``); the
pure-jnp reference (``dtf_jax.ops.reference``) is the oracle for every kernel.
"""

from dtf_jax.ops.api import deformable_aggregation
from dtf_jax.ops.api import deformable_correlation
from dtf_jax.ops.api import frame_wise_aggregation
from dtf_jax.ops.api import temporal_aggregation
from dtf_jax.ops.api import temporal_correlation
from dtf_jax.ops.api import temporal_correlation_aggregation
from dtf_jax.ops.reference import same_padding
from dtf_jax.ops.validation import IMPLS

__all__ = [
    'IMPLS',
    'deformable_aggregation',
    'deformable_correlation',
    'frame_wise_aggregation',
    'same_padding',
    'temporal_aggregation',
    'temporal_correlation',
    'temporal_correlation_aggregation',
]
