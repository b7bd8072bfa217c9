"""What every Megatron-style format shares (megatron .pt, torch_dist, NeMo, megatron-legacy,
mindspore): the checkpoint directory conventions (checkpoint), tensor names and canonical
shapes (names), parallel layout and placement (parallel), Megatron args <-> model dims and HF
config (config), assembling canonical tensors from rank shards (assemble) and the distributed
checkpoint planning torch_dist and NeMo 2 share (dcp). Adapters import this; it imports no
adapter."""
