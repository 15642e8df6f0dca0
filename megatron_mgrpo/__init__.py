"""M-GRPO (momentum-anchored GRPO) self-supervised RL on megatron-core."""

import warnings

# megatron-core announces at import time that Transformer Engine / Apex are missing and it
# falls back to torch; on a CPU machine that is the expected state, not news.
warnings.filterwarnings("ignore", message=r".*(not installed|Falling back to).*",
                        module=r"megatron\.")

# megatron-core still calls torch's all_gather_into_tensor, which torch now marks deprecated.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated.*",
                        category=FutureWarning)

__version__ = "0.1.0"
