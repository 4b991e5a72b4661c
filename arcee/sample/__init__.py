"""arcee.sample"""
