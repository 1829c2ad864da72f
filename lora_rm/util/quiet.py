"""Quiet by default: drop the third-party warnings, load reports and progress bars that are expected when a
causal-LM checkpoint becomes a reward model, and keep every other warning. `lora-rm --verbose` skips this.

Each filter names one message we have seen and why it is harmless here; anything else still gets through.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# (category, message regex): Python warnings that are expected for a reward model.
EXPECTED_WARNINGS = [
    # transformers 5 renamed it; PEFT and accelerate still ask the old name
    (FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),
    # an adapter trained on an int8 GPT-2 (Linear layers) meets Conv1D on a full-precision base: PEFT flips it
    (UserWarning, r"fan_in_fan_out is set to False but the target module is `Conv1D`"),
    (UserWarning, r"fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"),
]
# (logger, message regex): log records that are expected.
EXPECTED_LOGS = [
    # bitsandbytes' optional CPU kernel for 4-bit matmuls; the built-in path is used instead
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward"),
    # LLM.int8 casts matmul inputs to fp16 by design and says so on every call
    ("bitsandbytes.autograd._functions", r"MatMul8bitLt: inputs will be cast"),
    # lora_rm tokenizes a whole text, then cuts it to max_length itself (prompt from the left, response tail
    # kept): the model never sees the over-long ids this warns about
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than the specified"),
]
# transformers logs the report on the caller's logger (modeling_utils), or its own by default
LOAD_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")
# Keys a reward model is expected to lack (the new head) or to drop (the pre-training head) when it is built
# from a base checkpoint.
EXPECTED_MISSING = re.compile(r"^(score|classifier|pooler|pre_classifier)\.")
EXPECTED_UNEXPECTED = re.compile(r"^(lm_head|cls|vocab_\w+|pre_classifier)\.")


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# transformers colours the report (`MISSING` in red) when stdout is a terminal
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def expected_load_report(message: str) -> bool:
    """True when a transformers LOAD REPORT, coloured or not, lists only keys a reward model is expected to
    miss or drop."""
    message = ANSI_CODE.sub("", message)
    if "LOAD REPORT" not in message:
        return False
    rows = [
        [cell.strip() for cell in line.split("|")]
        for line in message.splitlines()
        if "|" in line and not line.lstrip().startswith(("Key", "-"))
    ]
    for row in rows:
        key, status = (row + ["", ""])[:2]
        if status == "MISSING" and EXPECTED_MISSING.match(key):
            continue
        if status == "UNEXPECTED" and EXPECTED_UNEXPECTED.match(key):
            continue
        return False
    return True


class _DropExpectedLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not expected_load_report(record.getMessage())


def quiet_third_party(bars: bool = True) -> None:
    """Install the filters (idempotent; before bitsandbytes is imported, since it warns at import). With
    `bars`, when stderr is not a terminal, also turn off transformers' and datasets' progress bars ("Loading weights",
    "Generating train split"): in a log file they are lines of carriage returns."""
    for category, message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message in EXPECTED_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMessages(message))
    for name in LOAD_REPORT_LOGGERS:
        report_logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedLoadReport) for f in report_logger.filters):
            report_logger.addFilter(_DropExpectedLoadReport())
    if bars and not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


VERBOSE_ENV = "LORA_RM_VERBOSE"  # set to 1: the Python API leaves third-party messages alone
_shown = False  # set by `show_third_party`


def quiet_by_default() -> None:
    """The Python API's quiet default, called where it loads models (`train`, `RewardModel.from_pretrained`):
    the expected warnings and load reports are dropped as on the command line, unless `show_third_party()`
    was called or LORA_RM_VERBOSE=1. Progress bars are left to the libraries (a notebook draws them well)."""
    if not _shown and os.environ.get(VERBOSE_ENV, "") in ("", "0"):
        quiet_third_party(bars=False)


def show_third_party() -> None:
    """Turn the quiet default off (`--verbose`): every filter `quiet_third_party` installed is removed, and
    the Python API installs none again."""
    global _shown
    _shown = True
    patterns = {message for _, message in EXPECTED_WARNINGS}
    warnings.filters[:] = [
        f
        for f in warnings.filters
        if not (f[0] == "ignore" and f[1] is not None and f[1].pattern in patterns)
    ]
    for name in [n for n, _ in EXPECTED_LOGS] + list(LOAD_REPORT_LOGGERS):
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, (_DropMessages, _DropExpectedLoadReport))]:
            logger.removeFilter(f)


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr, shown only when stderr is a terminal (logs get the timed line the caller
    prints instead of carriage-return noise)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None if enabled else True)
