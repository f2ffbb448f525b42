"""Trajectory methods: a student that takes the teacher's ODE in fewer, longer steps (halving rounds, segments,
anytime-to-anytime jumps)."""
