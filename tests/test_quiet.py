"""lora_rm.quiet: the expected third-party noise is dropped, anything else still gets through."""

from __future__ import annotations

import logging
import warnings

from lora_rm.quiet import expected_load_report, quiet_third_party

HEAD_ONLY = """GPT2ForSequenceClassification LOAD REPORT from: gpt2
Key          | Status  |
-------------+---------+-
score.weight | MISSING |

Notes:
- MISSING:	those params were newly initialized because missing from the checkpoint."""


def test_load_report_of_the_new_head_is_expected():
    assert expected_load_report(HEAD_ONLY)
    bert = HEAD_ONLY.replace(
        "score.weight | MISSING |", "classifier.weight | MISSING |\ncls.predictions.bias | UNEXPECTED |"
    )
    assert expected_load_report(bert)
    assert not expected_load_report(HEAD_ONLY.replace("score.weight", "transformer.h.0.attn.c_attn.weight"))
    assert not expected_load_report(HEAD_ONLY.replace("MISSING |", "MISMATCH |"))
    assert not expected_load_report("some other warning")


def test_expected_noise_is_dropped_and_the_rest_kept():
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter per logger
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    seen_logs: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen_logs.append(record.getMessage())
    tokenization = logging.getLogger("transformers.tokenization_utils_base")
    loggers = [bnb, logging.getLogger("transformers.modeling_utils"), tokenization]
    for logger in loggers:  # transformers' loggers do not propagate to the root logger
        logger.addHandler(handler)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: no module")
        bnb.warning("CUDA is broken")
        loggers[1].warning(HEAD_ONLY)
        loggers[1].warning(HEAD_ONLY.replace("score.weight", "wte.weight"))
        tokenization.warning(
            "Token indices sequence length is longer than the specified maximum sequence length for this model "
            "(623 > 512). Running this sequence through the model will result in indexing errors"
        )
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert seen_logs == ["CUDA is broken", HEAD_ONLY.replace("score.weight", "wte.weight")]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party()  # catch_warnings reset the filters
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=2,
        )
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it.",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn("something unexpected", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something unexpected"]
