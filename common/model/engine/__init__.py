"""The fast CPU forward: a lean decoder stack (`fast_decoder`), its KV cache, packed and native
(GGUF-precision) linear layers and their compiled kernels. Imports `common.core` and `common.model`."""
