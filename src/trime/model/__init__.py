"""Models: the fairseq-compatible Transformer LM and its adaptive input/softmax."""
