"""Position arm: model.position_embedding = "sincos"; everything else as configs/position/base.py."""
from configs.position import base


def get_config(arg=None):
    del arg
    return base.get_config("sincos")
