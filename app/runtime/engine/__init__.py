"""The TensorRT / TensorRT-RTX engine runner: compatibility policy, shape and buffer planning, execution.

Everything from deserialisation on (runner.py) is written against the documented TensorRT 11 /
TensorRT-RTX 1.7 Python API and has NEVER run on a GPU; compat.py and shapes.py are pure and tested on CPU.
"""
