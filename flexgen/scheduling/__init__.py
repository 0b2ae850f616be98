"""Schedulers (entry-point group ``flexgen.schedulers``): the order of (layer, GPU batch) tasks in a step.

``base.py`` is the interface (:class:`~flexgen.scheduling.base.Scheduler`); ``zigzag.py``
(each layer's weights serve every GPU batch before the next layer's) and ``row.py`` (one
batch through every layer, then the next) are the built-ins.
"""
