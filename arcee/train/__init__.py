"""arcee.train"""
