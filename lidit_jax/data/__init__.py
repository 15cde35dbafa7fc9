"""Input data: record format, synthetic shapes, converters and the Grain training pipeline.

Depends on no model code.
"""
