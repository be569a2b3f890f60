"""Evaluation of (aligned) encoders: XNLI and XQuAD zero-shot transfer, retrieval and word alignment.

Modules: ``squad`` (official SQuAD v1.1 scoring), ``alignment`` (Pharaoh I/O and AER), ``xnli`` and ``xquad``
(task fine-tuning and zero-shot testing), ``report`` (JSON, markdown tables, the paper comparison, plots).
The command line is ``python -m train.evaluate TASK ...``.
"""
