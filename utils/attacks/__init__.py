"""Layer 5, the attack kit: what the attack/ scripts share (poisoning, victim training, triggers,
record writing). Independent of the defense kit."""
