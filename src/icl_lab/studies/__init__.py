"""End-to-end studies: one module per study."""
