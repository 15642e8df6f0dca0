"""M-GRPO (momentum-anchored GRPO) self-supervised RL on megatron-core."""

import warnings

# megatron-core announces at import time that Transformer Engine / Apex are missing and it
# falls back to torch; on a CPU machine that is the expected state, not news.
warnings.filterwarnings("ignore", message=r".*(not installed|Falling back to).*",
                        module=r"megatron\.")

# megatron-core still calls collectives (all_gather_into_tensor, reduce_scatter_tensor) that
# torch now marks deprecated.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated.*",
                        category=FutureWarning)

# The distributed optimizer zeroes `.grad` of its fp32 shard views (non-leaf by design), and
# TransformerConfig's own default cuda_graph_scope trips its deprecation notice.
warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")
warnings.filterwarnings("ignore", message=r"full scope is deprecated", module=r"megatron\.")

__version__ = "0.1.0"
