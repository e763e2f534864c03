"""The training recipe (design doc section 7): data, masking, the joint AR + diffusion objective, the loop."""
