"""arcee.flow"""
