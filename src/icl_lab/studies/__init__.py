"""End-to-end studies: one module per study, all run by `icl_lab.studies.runner`."""

__all__: list[str] = []
