class LinearSelfAttention: pass
class GatedDeltaNet: pass
