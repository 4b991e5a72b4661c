"""arcee.data"""
