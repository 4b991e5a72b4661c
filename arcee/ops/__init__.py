"""arcee.ops"""
