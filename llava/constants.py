"""Token ids and strings shared by the LLaVA model, its data pipeline and its prompts."""

# Label value ignored by the loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100
# Placeholder id in ``input_ids`` where the image features are spliced in.
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
# Written by users in a query to say where the image goes (run_llava replaces it).
IMAGE_PLACEHOLDER = "<image-placeholder>"

# Where the original serving stack logs; kept for scripts that import it.
LOGDIR = "."
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
