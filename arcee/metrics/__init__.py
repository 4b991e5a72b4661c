"""arcee.metrics"""
