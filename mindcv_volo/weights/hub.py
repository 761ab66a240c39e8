"""The official weights from where they are published: timm's Hugging Face hub repositories, converted once.

`pretrained=True` (create_model, `--pretrained True`) fetches the repository's `model.safetensors` with
`huggingface_hub.hf_hub_download` (offline, or when the hub cannot be reached, it answers from its local
cache, `$HF_HOME/hub`), renames it to MindSpore's names without torch, and caches that as a .ckpt in
MindCV's download folder (`~/.mindspore/models`), which later calls load directly. As with any
fine-tuning start point, the model may have another img_size (pos_embed is resized) and another class
count (head and aux_head stay freshly initialised).
"""
import logging
import os

from mindcv.models.helpers import get_checkpoint_download_root

from ..errors import UserError
from .checkpoint import load_checkpoint_into, save_checkpoint
from .state import check_state, from_official_names, model_shapes
from .torch_zip import load_state_dict_file

logger = logging.getLogger("mindcv_volo")

HUB_FILE = "model.safetensors"  # timm's repositories also hold pytorch_model.bin: the same weights, pickled
HUB_URL_PREFIX = "hf-hub:"  # how a MindCV config's `url` names a hub repository
ALTERNATIVE = ("or convert the official weights with `python -m mindcv_volo.convert` and pass --ckpt_path FILE.ckpt "
               "(checkpoint_path= in create_model)")


def download(repo_id):
    """The local path of the repository's weights file: from the hub, or from huggingface_hub's cache."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # Without a network huggingface_hub retries for about 25 s, logging each try: the outcome is one line here.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return hf_hub_download(repo_id, HUB_FILE)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        cause = err.__cause__ or err
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}")
        raise UserError(f"{HUB_FILE} of {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                        f"cannot be downloaded ({why}); fetch it where the hub is reachable, {ALTERNATIVE}") from None
    finally:
        hub_logger.setLevel(level)


def cached_checkpoint(repo_id):
    """Where the converted weights of `repo_id` are kept: MindCV's download folder for model weights."""
    return os.path.join(get_checkpoint_download_root(), repo_id.replace("/", "--") + ".ckpt")


def load_hub_weights(model, repo_id):
    """Load the weights of `repo_id` into `model` (a VOLO), converting and caching them on first use."""
    cache = cached_checkpoint(repo_id)
    if not os.path.isfile(cache):
        src = download(repo_id)
        state = from_official_names(model, load_state_dict_file(src))
        if set(state) != set(model_shapes(model)):
            check_state(model, state, src)  # another architecture: names what differs, and nothing is cached
        save_checkpoint(state, cache)
        logger.info("converted %s (%s) to %s", repo_id, src, cache)
    logger.info("loading the official weights %s from %s", repo_id, cache)
    return load_checkpoint_into(model, cache, adapt=True, hint=f"{repo_id} holds the official architecture: only "
                                f"img_size and num_classes may differ (a damaged cache: delete {cache})")
