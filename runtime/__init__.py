"""TaskEdge device runtime: loads a bundle and adapts it on the board with plain onnxruntime
(an InferenceSession on the bundle's standard-ONNX step graph). Never imports torch, onnx or
ONNX Runtime's training build; onnxruntime itself only where a module runs it (`runtime/ort.py`), so
`taskedge --help`, profiles and the board diagnostics start without it.
"""
