"""Rectified-flow and flow-map methods: straighten the teacher's paths (reflow) or learn its flow map, so one
network call jumps from any time to any earlier one."""
