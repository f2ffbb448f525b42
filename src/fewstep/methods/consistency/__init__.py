"""Consistency models: a student that maps any point of the teacher's ODE to its clean end (or a phase's edge)."""
